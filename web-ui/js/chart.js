// Small SVG line charts for trends (no library). A chart is an image to assistive technology,
// labelled with its title and each series' latest value; the legend repeats those in text.

import { h, s } from '/ui/js/dom.js';

const W = 600;
const H = 170;
const PAD = { l: 48, r: 10, t: 10, b: 22 };

// series: [{ name, points: [{ t: epoch ms, v: number|null }] }]
export function lineChart(title, series, { yFormat = (v) => String(v), yMin = 0, yMax, from, to } = {}) {
  const all = series.flatMap((x) => x.points).filter((p) => p.v !== null && p.v !== undefined && !Number.isNaN(p.v));
  const t0 = from ?? Math.min(...all.map((p) => p.t));
  const t1 = to ?? Math.max(...all.map((p) => p.t));
  let hi = yMax ?? Math.max(...all.map((p) => p.v), yMin);
  // All zero (or no data): a unit scale rather than five labels reading 0.
  if (!Number.isFinite(hi) || hi <= yMin) hi = yMin + 1;
  if (yMax === undefined) hi = niceCeil(hi);
  const x = (t) => PAD.l + ((t - t0) / Math.max(1, t1 - t0)) * (W - PAD.l - PAD.r);
  const y = (v) => H - PAD.b - ((v - yMin) / (hi - yMin)) * (H - PAD.t - PAD.b);
  const latest = series.map((sr) => {
    const last = [...sr.points].reverse().find((p) => p.v !== null && p.v !== undefined);
    return { name: sr.name, value: last ? yFormat(last.v) : 'no data' };
  });
  const label = `${title}: ${latest.map((l) => `${l.name} ${l.value}`).join(', ') || 'no data'}`;

  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label },
    s('title', {}, label));
  // Without data a scale would only invent numbers: draw the baseline alone.
  for (let i = 0; i <= (all.length ? 4 : 0); i++) {
    const v = yMin + ((hi - yMin) * i) / 4;
    svg.append(s('line', { class: i ? 'grid-line' : 'axis', x1: PAD.l, x2: W - PAD.r, y1: y(v), y2: y(v) }));
    if (all.length) svg.append(s('text', { x: PAD.l - 6, y: y(v) + 4, 'text-anchor': 'end' }, yFormat(v)));
  }
  if (all.length && Number.isFinite(t0) && Number.isFinite(t1)) {
    const ends = t1 - t0 >= 60_000 ? [[t0, 'start'], [t1, 'end']] : [[t1, x(t1) < W / 2 ? 'start' : 'end']];
    for (const [t, anchor] of ends) {
      svg.append(s('text', { x: x(t), y: H - 6, 'text-anchor': anchor },
        new Date(t).toLocaleTimeString(undefined, { hour12: false, hour: '2-digit', minute: '2-digit' })));
    }
    series.forEach((sr, i) => {
      // Gaps (null values) break the line rather than drawing through missing data.
      let d = '';
      let pen = false;
      for (const p of sr.points) {
        if (p.v === null || p.v === undefined || Number.isNaN(p.v)) { pen = false; continue; }
        d += `${pen ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(Math.min(p.v, hi)).toFixed(1)}`;
        pen = true;
      }
      if (d) svg.append(s('path', { class: `line s${i % 6}`, d, 'data-series': sr.name }));
      if (sr.points.filter((p) => p.v !== null && p.v !== undefined).length === 1) {
        const p = sr.points.find((q) => q.v !== null && q.v !== undefined);
        svg.append(s('circle', { cx: x(p.t), cy: y(p.v), r: 3, class: `line s${i % 6}` }));
      }
    });
  } else {
    svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no data yet'));
  }
  return h('figure', { class: 'panel chart-panel' },
    h('figcaption', {}, h('h3', {}, title)),
    svg,
    h('ul', { class: 'legend', 'aria-hidden': 'true' },
      latest.map((l, i) => h('li', {}, h('span', { class: `swatch s${i % 6}` }), `${l.name}: ${l.value}`))));
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// Turns a MetricsSeries into chart points for one field.
export function pointsOf(series, field, scale = 1) {
  return (series?.points || []).map((p) => ({
    t: new Date(p.at).getTime(),
    v: p[field] === null || p[field] === undefined ? null : p[field] * scale,
  }));
}

// Merges several MetricsSeries (e.g. one per deployment) bucket by bucket: rates and tokens
// summed, p50s averaged, p99s the worst (as the API does across workers).
export function mergeSeries(list) {
  const byT = new Map();
  for (const series of list) {
    for (const p of series?.points || []) {
      const t = new Date(p.at).getTime();
      const acc = byT.get(t) || { t, request_rate: 0, tokens_per_s: 0, n50: 0, ttft50: 0, itl50: 0, ttft_p99_ms: null, itl_p99_ms: null };
      acc.request_rate += p.request_rate || 0;
      acc.tokens_per_s += p.tokens_per_s || 0;
      if (p.ttft_p50_ms !== null && p.ttft_p50_ms !== undefined) { acc.ttft50 += p.ttft_p50_ms; acc.n50 += 1; }
      if (p.itl_p50_ms !== null && p.itl_p50_ms !== undefined) { acc.itl50 += p.itl_p50_ms; acc.nitl = (acc.nitl || 0) + 1; }
      if (p.ttft_p99_ms !== null && p.ttft_p99_ms !== undefined) acc.ttft_p99_ms = Math.max(acc.ttft_p99_ms ?? 0, p.ttft_p99_ms);
      if (p.itl_p99_ms !== null && p.itl_p99_ms !== undefined) acc.itl_p99_ms = Math.max(acc.itl_p99_ms ?? 0, p.itl_p99_ms);
      byT.set(t, acc);
    }
  }
  return [...byT.values()].sort((a, b) => a.t - b.t).map((a) => ({
    t: a.t,
    request_rate: a.request_rate,
    tokens_per_s: a.tokens_per_s,
    ttft_p50_ms: a.n50 ? a.ttft50 / a.n50 : null,
    itl_p50_ms: a.nitl ? a.itl50 / a.nitl : null,
    ttft_p99_ms: a.ttft_p99_ms,
    itl_p99_ms: a.itl_p99_ms,
  }));
}
