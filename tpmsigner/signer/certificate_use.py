"""Which OpenSSH certificate, if any, a sign request uses.

A certificate changes what a client presents, never the signature: the
identity's key signs either way (PROTOCOL.certkeys).  The signer still
shows the person which certificate a login uses, because the certificate
decides which accounts it opens.
"""

from __future__ import annotations

from ..errors import CertificateError
from ..protocol.certificates import Certificate, decode_certificate
from ..protocol.signeddata import SignedDataInfo
from ..store import Identity


def certificate_in_use(identity: Identity, key_blob: bytes, info: SignedDataInfo) -> Certificate | None:
    """Return the certificate that a request to sign with ``key_blob`` uses, or None for the plain key.

    A client names the certificate as the key to sign with, or, as
    OpenSSH's ssh does when the agent lists both, names the plain key and
    offers the certificate in the userauth request.  A certificate that the
    identity does not store (ssh's CertificateFile option) has its CA
    signature checked here; CertificateError if it is invalid, because an
    honest ssh client verifies a certificate before it offers one.
    """
    blob = info.certificate
    if blob is None and key_blob == identity.certificate_blob:
        blob = key_blob
    if blob is None:
        return None
    if blob == identity.certificate_blob:
        return identity.certificate

    # describe_signed_data already checked that this certificate is for
    # the key that signs.
    try:
        return decode_certificate(blob)
    except CertificateError as exc:
        raise CertificateError(f"the login offers an invalid certificate: {exc}") from None
