// Building DOM without innerHTML: every value from the API goes in as text, never as markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const svgNs = 'http://www.w3.org/2000/svg';
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(svgNs, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Replaces the contents of `slot` with `node` unless they render the same, so a poll that
// changed nothing does not steal focus or scroll position.
export function patch(slot, node) {
  const next = node instanceof Node ? node : h('div', {}, node);
  const key = next.outerHTML ?? next.textContent;
  if (slot.dataset.rendered === key) return;
  slot.replaceChildren(next);
  slot.dataset.rendered = key;
}

export function table(columns, rows, { caption, empty = 'Nothing here yet.', rowAttrs } = {}) {
  if (!rows.length) return h('p', { class: 'empty' }, empty);
  return h('div', { class: 'table-wrap' },
    h('table', {},
      caption ? h('caption', { class: 'visually-hidden' }, caption) : null,
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
      h('tbody', {}, rows.map((row) => h('tr', rowAttrs ? rowAttrs(row) : {},
        columns.map((c) => h('td', { class: c.num ? 'num' : null, 'data-col': c.key || c.label }, c.value(row))))))));
}

export function badge(text, tone = 'muted') {
  return h('span', { class: `badge ${tone}` }, text);
}

// A labelled input with a slot for the error the server reports for it. `name` is the JSON
// path the API names in invalid_params (e.g. `sla.ttft_ms`).
export function field({ label, name, type = 'text', value = '', hint, options, required, min, step, placeholder, disabled }) {
  const id = `f-${name.replace(/[^a-z0-9]+/gi, '-')}`;
  const errorId = `${id}-error`;
  const hintId = hint ? `${id}-hint` : null;
  let input;
  if (options) {
    input = h('select', { id, name, disabled },
      options.map((o) => {
        const [v, text] = Array.isArray(o) ? o : [o, o];
        return h('option', { value: v, selected: String(v) === String(value) }, text);
      }));
  } else if (type === 'checkbox') {
    input = h('input', { id, name, type, checked: Boolean(value), disabled });
    return h('div', { class: 'field check' }, input, h('label', { for: id }, label),
      h('p', { class: 'field-error', id: errorId, hidden: true }));
  } else {
    input = h('input', { id, name, type, value: value ?? '', required, min, step, placeholder, disabled, autocomplete: 'off' });
  }
  input.setAttribute('aria-describedby', [hintId, errorId].filter(Boolean).join(' '));
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    input,
    hint ? h('span', { class: 'hint', id: hintId }, hint) : null,
    h('p', { class: 'field-error', id: errorId, hidden: true }));
}

export function clearErrors(form) {
  for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
  for (const el of form.querySelectorAll('.field-error')) { el.textContent = ''; el.hidden = true; }
  const general = form.querySelector('.form-error');
  if (general) { general.textContent = ''; general.hidden = true; }
}

// Puts each of a problem's invalid_params next to its field; what has no field (or no
// invalid_params at all) goes in the form's general error line. Focuses the first bad field.
export function showProblem(form, problem) {
  clearErrors(form);
  const general = form.querySelector('.form-error');
  const leftovers = [];
  let first = null;
  for (const param of problem.invalidParams || []) {
    const input = findField(form, param.name);
    if (!input) { leftovers.push(`${param.name}: ${param.reason}`); continue; }
    input.setAttribute('aria-invalid', 'true');
    const err = form.querySelector(`#${CSS.escape(input.id)}-error`);
    if (err) { err.textContent = param.reason; err.hidden = false; }
    first = first || input;
  }
  if (!problem.invalidParams?.length || leftovers.length) {
    general.textContent = [problem.message, ...leftovers].filter(Boolean).join(' — ');
    general.hidden = false;
  }
  (first || general).focus?.();
}

function findField(form, name) {
  // The API names nested fields by path (`sla.ttft_ms`, `placement.node_labels.zone`); walk up
  // the path until a field matches.
  let path = name;
  while (path) {
    const el = form.querySelector(`[name="${CSS.escape(path)}"]`);
    if (el) return el;
    const cut = Math.max(path.lastIndexOf('.'), path.lastIndexOf('['));
    if (cut <= 0) break;
    path = path.slice(0, cut);
  }
  return null;
}

export function formError() {
  return h('p', { class: 'form-error', role: 'alert', tabindex: '-1', hidden: true });
}

export function announce(text) {
  const live = document.getElementById('live');
  if (live) { live.textContent = ''; setTimeout(() => { live.textContent = text; }, 30); }
}
