"""Who is calling, and how it was proven.

`workload` is the proven identity itself; `x509` applies the X.509-SVID rules to a verified
client certificate, `svid_cache` remembers those mappings; `tls` builds the TLS contexts the
broker serves and connects with; `ca` is the development-only CA. Every mapping is pure: an
unproven caller is never mapped to an identity.
"""

from .workload import IdentityError, Method, MissingCertificate, WorkloadIdentity, local_identity
from .x509 import identity_from_certificate, identity_from_der

__all__ = [
    "IdentityError",
    "Method",
    "MissingCertificate",
    "WorkloadIdentity",
    "identity_from_certificate",
    "identity_from_der",
    "local_identity",
]
