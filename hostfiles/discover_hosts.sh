#!/usr/bin/env bash
# Horovod elastic host discovery script: prints the hosts that may run workers now, one `host:slots` per line.
#
#   horovodrun -np 4 --min-np 2 --max-np 8 --host-discovery-script hostfiles/discover_hosts.sh python bin/...
#
# Horovod runs it every few seconds; adding or removing a line in the hosts file grows or shrinks the job.
# The hosts file (env HVD_PCDARTS_HOSTS_FILE, default hostfiles/elastic_hosts next to this script) holds lines
# `host:slots`; blank lines and `#` comments are ignored. A malformed line or a missing file is an error (one
# line on stderr, exit 2): better a loud failure than a job that silently shrinks to nothing.
set -euo pipefail

HOSTS_FILE=${HVD_PCDARTS_HOSTS_FILE:-"$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/elastic_hosts"}

if [ ! -f "$HOSTS_FILE" ]; then
  echo "discover_hosts.sh: hosts file $HOSTS_FILE not found (set HVD_PCDARTS_HOSTS_FILE or create it with lines host:slots)" >&2
  exit 2
fi

n=0
while IFS= read -r line || [ -n "$line" ]; do
  n=$((n + 1))
  line=${line%%#*}                      # drop comments
  line="${line#"${line%%[![:space:]]*}"}"   # trim leading
  line="${line%"${line##*[![:space:]]}"}"   # and trailing white space
  [ -z "$line" ] && continue
  if [[ ! $line =~ ^[A-Za-z0-9._-]+:[1-9][0-9]*$ ]]; then
    echo "discover_hosts.sh: $HOSTS_FILE line $n: expected host:slots (e.g. node0:4), got '$line'" >&2
    exit 2
  fi
  echo "$line"
done < "$HOSTS_FILE"
