#!/bin/sh
# Writes the secret files docker-compose.yml mounts (secrets/, next to this script; never committed): a random
# Redis password, a token per student, the teacher's tokens file naming both students, a Grafana admin password.
# Existing files are kept, so running it again changes nothing; delete a file to make it anew.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
new() { [ -s "secrets/$1" ] || openssl rand -hex 24 > "secrets/$1"; }
new redis-password
new student-a-token
new student-b-token
new grafana-admin-password
if [ ! -s secrets/tokens.yaml ]; then
  printf 'student-a: %s\nstudent-b: %s\n' "$(cat secrets/student-a-token)" "$(cat secrets/student-b-token)" \
    > secrets/tokens.yaml
fi
echo "secrets written to $(pwd)/secrets"
