# kvfleet-controlplane %postun ($1: 0 on erase, 1 on upgrade): a running service restarts on upgrade
# (try-restart). RPM has no purge: like `apt remove`, an erase keeps state, logs, the user
# and a modified config (as .rpmsave); docs/install.md lists what to delete by hand.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart kvfleet-controlplane.service >/dev/null 2>&1 || :
    fi
fi
exit 0
