// Formatting numbers, sizes and times for people.

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n); let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

export function pct(x) {
  return x === null || x === undefined || Number.isNaN(x) ? '—' : `${(x * 100).toFixed(0)}%`;
}

export function num(x, digits = 1) {
  return x === null || x === undefined || Number.isNaN(x) ? '—' : Number(x).toFixed(digits);
}

export function ms(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '—';
  if (x >= 1000) return `${(x / 1000).toFixed(2)} s`;
  return `${Number(x).toFixed(x < 10 ? 1 : 0)} ms`;
}

export function ago(iso, now = Date.now()) {
  if (!iso) return 'never';
  const s = Math.round((now - new Date(iso).getTime()) / 1000);
  if (s < 2) return 'just now';
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function time(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false, year: 'numeric', month: 'short', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function shortId(id) {
  return id ? String(id).slice(0, 8) : '—';
}

// Tones for state badges.
export function stateTone(state) {
  switch (state) {
    case 'healthy': case 'ready': case 'running': return 'ok';
    case 'joining': case 'pending': case 'starting': case 'draining': return 'info';
    case 'unhealthy': case 'stopped': return 'warn';
    case 'lost': case 'failed': case 'removed': return 'bad';
    default: return 'muted';
  }
}
