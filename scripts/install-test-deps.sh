#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine: OpenSSH (server and client, for
# the loopback SSH hosts), git, chromium (the web UI's tests drive it with Playwright), and
# the Python dependencies in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v git >/dev/null || need+=(git)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo_="" ; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  echo "installing ${need[*]}" >&2
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
scripts/bootstrap.sh test,bench
