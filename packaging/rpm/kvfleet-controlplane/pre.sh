# kvfleet-controlplane %pre: the control plane's own system user kvfleet-cp exists before the files
# land (the config file belongs to its group). Keep in step with
# packaging/deb/kvfleet-controlplane/postinst.
getent group kvfleet-cp >/dev/null || groupadd --system kvfleet-cp
getent passwd kvfleet-cp >/dev/null || useradd --system --gid kvfleet-cp --no-create-home \
    --home-dir /var/lib/kvfleet/controlplane --shell /usr/sbin/nologin \
    --comment "kvfleet control plane" kvfleet-cp
exit 0
