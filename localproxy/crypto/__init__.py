"""Message protection: the OpenPGP engine (openpgp), PGP/MIME and S/MIME structures, policy."""
