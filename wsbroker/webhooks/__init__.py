"""Signed webhooks (SPEC §13): the backend hears what happens on its channels.

For receivers, one function::

    from wsbroker.webhooks import verify, WebhookVerificationError

    verify("whsec_…", request.headers, raw_body)  # raises WebhookVerificationError

The node side (:mod:`.service`, :mod:`.tracking`, :mod:`.delivery`) is
imported by the node only when ``--webhook-url`` is set, so receivers and
nodes without webhooks do not load the HTTP client.
"""

from wsbroker.webhooks.signing import WebhookVerificationError, sign, verify

__all__ = ["WebhookVerificationError", "sign", "verify"]
