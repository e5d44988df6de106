"""``adapterctl validate`` (filled in with the validation rules)."""
