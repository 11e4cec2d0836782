#!/usr/bin/env bash
# Installs the Debian packages m1 builds and tests with, when any are missing. As root it runs
# apt-get; otherwise it prints the exact command to run and fails. Packages named as arguments
# are checked too (`make fuzz` adds clang, which nothing else needs).
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  nlohmann-json3-dev libfmt-dev libspdlog-dev libcli11-dev libpcre2-dev libcpp-httplib-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3  # turns the CUDA kernels into C++ for their CPU-emulated tests
  curl procps  # .ci/run asks the demo server for a chat completion (curl), finds its pid (pgrep)
  "$@"
)
# The openai client test runs Node.js and npm. Any install of them will do (Debian's, or
# NodeSource's, whose nodejs package carries npm): only when npm is absent are Debian's named.
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "m1: missing packages; install them with:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "m1: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${missing[@]}" || {
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
}
