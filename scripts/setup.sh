#!/usr/bin/env bash
# Everything tabbi needs on a fresh Debian machine of this kind, idempotent:
# system packages (git, bubblewrap, ripgrep; chromium for the browser tests), a virtualenv with tabbi and its test tools, the
# server extension enabled in that virtualenv, and OpenCode pinned from npm into ./node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v git >/dev/null || need+=(git)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v rg >/dev/null || need+=(ripgrep)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
# On a fresh machine another apt (unattended-upgrades, cloud-init) often holds the lock for a
# while: wait for it (up to 10 minutes) instead of failing. `DPkg::Lock::Timeout` makes apt-get
# wait for dpkg's lock; the lists lock of `update` is retried here while apt says it is locked.
apt_wait=(-o DPkg::Lock::Timeout=600)
apt_update() {
  local out
  for _ in $(seq 60); do
    if out=$(apt-get "${apt_wait[@]}" update -qq 2>&1); then return 0; fi
    case "$out" in
      *"Could not get lock"* | *"Unable to lock"*) echo "setup: another apt holds its lock; waiting" >&2; sleep 10 ;;
      *) echo "$out" >&2; return 1 ;;
    esac
  done
  echo "$out" >&2
  return 1
}

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_wait[@]}" install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: missing ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
    command -v git >/dev/null && command -v npm >/dev/null || exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
echo "setup: pip install -e .[test,lab]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,lab]" 2>&1 \
  | { grep -v "WARNING: Location" || true; }
# An editable install carries no data files: enable the server extension like a wheel would.
mkdir -p .venv/etc/jupyter/jupyter_server_config.d
cp jupyter-config/jupyter_server_config.d/tabbi.json .venv/etc/jupyter/jupyter_server_config.d/

if [ "$(node_modules/.bin/opencode --version 2>/dev/null || true)" != "$(node -p 'require("./package.json").dependencies["opencode-ai"]')" ] \
   || [ ! -x node_modules/.bin/configurable-http-proxy ]; then  # JupyterHub's proxy: make hub, tests/test_hub.py
  # `npm install` (not `npm ci`): npm leaves the other platforms' optional binaries out of the
  # lock file, and `npm ci` then refuses it. package.json pins the exact version.
  echo "setup: npm install (OpenCode, configurable-http-proxy; pinned)"
  npm install --no-audit --no-fund --loglevel=error
fi
# The Convex functions' own tests and the loopback Convex stand-in: convex/ is its own npm project
# (convex, convex-test, vitest, tsx), pinned by its lock file.
if [ ! -e convex/node_modules/.package-lock.json ] || [ convex/package-lock.json -nt convex/node_modules/.package-lock.json ]; then
  echo "setup: npm ci in convex/"
  (cd convex && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup: ready (OpenCode $(node_modules/.bin/opencode --version))"
