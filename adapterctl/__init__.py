"""adapterctl: inspect, validate, version, compose, diff and merge LoRA adapters.

The package stays light on import: nothing here pulls in torch, so ``adapterctl --help``
starts fast. Import the submodules you need (``adapterctl.formats``, ``adapterctl.introspect``…).
"""

__version__ = "0.1.0"
