"""IMAP side: sans-IO codec, decrypted FETCH view, session relay."""
