"""tokenwarden."""
