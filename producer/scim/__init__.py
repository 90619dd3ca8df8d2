"""SCIM 2.0 (RFC 7643/7644) service provider at ``/scim/v2`` for Okta and Microsoft Entra ID.

routes.py answers the requests, resources.py reads and writes SCIM resources (with
scim2-models), store.py keeps users and groups and turns their changes into events
(worker/domain/scim.py) in the same transaction, errors.py shapes every refusal. Must not
import ``producer.api``, the other routers or ``tasks``.
"""
