#!/usr/bin/env bash
# Install everything the tests need, then run them all. CI runs exactly this (.ci/run).
# System packages come from Debian (thrift-compiler generates Apache Thrift classes
# for the differential tests; g++, libthrift-dev and the Boost headers libthrift's
# include build the C++ peers of the interop tests, a JDK and libthrift-java their
# Java peers; zookeeper backs the zk:// registry tests, which start and stop their
# own server on the JDK's runtime); Python packages from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v thrift >/dev/null 2>&1 || need_apt+=(thrift-compiler)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
[ -d /usr/include/thrift ] || need_apt+=(libthrift-dev)
[ -d /usr/include/boost ] || need_apt+=(libboost-dev)
[ -d /usr/share/zookeeper ] || need_apt+=(zookeeper)
command -v javac >/dev/null 2>&1 || need_apt+=(default-jdk-headless)
[ -f /usr/share/java/thrift.jar ] || need_apt+=(libthrift-java)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
    fi
fi

python3 -m pip install -q --upgrade pip >/dev/null
python3 -m pip install -q -e '.[test,zookeeper]'
exec python3 -m pytest tests "$@"
