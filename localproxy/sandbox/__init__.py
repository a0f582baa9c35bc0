"""A real mail provider on loopback (Dovecot + Postfix with a private CA), for the
demo and the end-to-end tests. Needs the Debian packages dovecot-core,
dovecot-imapd, dovecot-lmtpd and postfix, and trustme (the demo/test extras)."""
