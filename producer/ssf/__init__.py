"""Shared Signals Framework push receiver (RFC 8935): RISC and CAEP Security Event Tokens.

- ``keys``: each trusted transmitter's signing keys (its JWKS), fetched and paced as
  producer/key_cache.py does for GitHub's keys.
- ``verify``: a SET's signature and claims, with the RFC 8935 error code of each refusal.
- ``signals``: which of our events a verified SET becomes, if any.

The route is producer/routes/ssf.py; the events it makes go through the same inbox as
``POST /v1/events``.
"""
