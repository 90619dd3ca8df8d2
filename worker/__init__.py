"""The tokenwarden domain: token store, token format, verification and revocation."""
