"""Sidekey: a secretless credential broker."""

import warnings

__version__ = "0.1.0"

# py-spiffe names cryptography's DSA key class (in its JWT bundle module), and cryptography 51
# deprecated DSA with a warning on that lookup: a bare line on stderr at every start, ahead of
# the JSON log. The broker loads no DSA key (JWT bundles: RSA, EC, Ed25519 only).
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"spiffe(\.|$)")
