"""Test harness: a throw-away test CA (ca.py) and a real Dovecot + Postfix provider on loopback
(provider.py). Import from the submodules; this package imports nothing on purpose, so that
importing one helper module never drags in the others."""
