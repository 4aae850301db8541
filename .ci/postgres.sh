# Sourced by tests/run.sh: a throwaway PostgreSQL server on loopback for the tests that run several
# tuner processes against one database. Exports its URL as KERNELHUB_TEST_POSTGRES and stops it
# when the calling shell exits. Installs Debian's `postgresql` package when the server binaries
# are missing and we are root with apt-get; anywhere else those tests skip and say why.
# tests/postgres.py does the work (one implementation for this script and the pytest fixture).
# A KERNELHUB_TEST_POSTGRES already set (a server of your own) is used as it is.

if [ -z "${KERNELHUB_TEST_POSTGRES:-}" ]; then
    kh_python=${PYTHON:-python3}
    if ! "$kh_python" tests/postgres.py binaries >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "installing PostgreSQL (Debian package postgresql) for the shared-database tests"
            # Without package lists (a fresh image) the first try fails: update them, then try again.
            kh_apt_install() {
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
                    >/dev/null 2>&1
            }
            kh_apt_install || { apt-get update -qq >/dev/null 2>&1 && kh_apt_install; } \
                || echo "apt-get could not install postgresql"
        else
            echo "no PostgreSQL server binaries, and not root with apt-get to install them"
        fi
    fi
    kh_postgres_dir=$(mktemp -d)
    if kh_postgres_url=$("$kh_python" tests/postgres.py start "$kh_postgres_dir"); then
        export KERNELHUB_TEST_POSTGRES=$kh_postgres_url
        trap '"$kh_python" tests/postgres.py stop "$kh_postgres_dir"' EXIT
        echo "PostgreSQL for the tests at $KERNELHUB_TEST_POSTGRES"
    else
        rm -rf "$kh_postgres_dir"
        echo "no PostgreSQL server: the PostgreSQL tests will skip"
    fi
fi
