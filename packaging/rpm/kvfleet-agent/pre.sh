# kvfleet-agent %pre: the agent's own system user kvfleet-agent exists before the files land (the
# config file belongs to its group). Keep in step with packaging/deb/kvfleet-agent/postinst.
getent group kvfleet-agent >/dev/null || groupadd --system kvfleet-agent
getent passwd kvfleet-agent >/dev/null || useradd --system --gid kvfleet-agent --no-create-home \
    --home-dir /var/lib/kvfleet/agent --shell /usr/sbin/nologin --comment "kvfleet agent" kvfleet-agent
# GPU device nodes may belong to video (NVIDIA's NVreg_DeviceFileGID) or render (/dev/dri).
for group in video render; do
    if getent group "$group" >/dev/null; then usermod --append --groups "$group" kvfleet-agent; fi
done
exit 0
