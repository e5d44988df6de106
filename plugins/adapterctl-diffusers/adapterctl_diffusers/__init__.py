"""adapterctl-diffusers: Stable Diffusion LoRA files in kohya and diffusers naming, read as
adapters every adapterctl command works on, and written in kohya naming (``adapterctl convert
--to kohya``); see ``adapterctl_diffusers.sd``.

This module is the plugin adapterctl loads (entry point ``adapterctl``): cheap to import.
"""

from __future__ import annotations

from typing import Any

from adapterctl.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_formats(register: Any) -> None:
    from adapterctl_diffusers.sd import DiffusersFile, DiffusersPeftFile, KohyaFile, LycorisFile

    register(LycorisFile())
    register(KohyaFile())
    register(DiffusersPeftFile())
    register(DiffusersFile())


@hookimpl
def register_writers(register: Any) -> None:
    from adapterctl_diffusers.sd import KohyaWriter

    register(KohyaWriter())
