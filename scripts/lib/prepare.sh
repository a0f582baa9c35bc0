# Sourced by scripts/test and scripts/demo: make this machine ready.
# Debian packages (as root, only when missing) and a virtualenv with the
# package and the given extras (again only when pyproject.toml changed).

DEBS=(dovecot-core dovecot-imapd dovecot-lmtpd postfix gnupg sq rnp gpgsm openssl isync swaks)
VENV=${LOCALPROXY_VENV:-.venv}

missing_debs() {
  local p
  for p in "${DEBS[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || echo "$p"
  done
}

install_debs() {
  command -v dpkg-query >/dev/null || { echo "not a Debian system; install ${DEBS[*]} yourself" >&2; return 0; }
  local missing
  mapfile -t missing < <(missing_debs)
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${missing[*]}" >&2
    echo "  run as root, or: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    return 0
  fi
  echo "installing ${missing[*]}"
  # Postfix asks a question on install; localproxy runs it from a private config.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  local py
  for py in python3 python3.13 python3.12 python3.11; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return
    fi
  done
  echo "Python 3.11 or newer is required" >&2; exit 2
}

install_python_packages() {  # $1: extras, e.g. "test" or "demo"
  [ -x "$VENV/bin/python" ] || "$(pick_python)" -m venv "$VENV"
  local stamp="$VENV/.installed-$1-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "installing localproxy[$1] into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$1]"
    rm -f "$VENV"/.installed-"$1"-*
    touch "$stamp"
  fi
}
