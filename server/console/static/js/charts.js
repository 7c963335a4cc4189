// Hand-written SVG charts: a multi-series line chart and a stacked bar.
import { s, clear } from './dom.js';

const H = 200;
const DEFAULT_W = 600;

// Drawn at the element's own width, so text is never scaled down on narrow cards.
const widthOf = (svg) => Math.max(Math.round(svg.getBoundingClientRect().width), 200) || DEFAULT_W;
const PAD = { left: 48, right: 12, top: 12, bottom: 24 };

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function label(v) {
  if (v === 0) return '0';
  if (Math.abs(v) >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (Math.abs(v) < 0.01) return v.toExponential(0);
  return Number(v.toPrecision(3)).toString();
}

// series: [{name, cls, points: [[x, y], ...]}]; y null leaves a gap.
// opts: {xMin, xMax, yMax, xFormat}
export function lineChart(svg, series, opts = {}) {
  const W = widthOf(svg);
  const xs = series.flatMap((sr) => sr.points.map((p) => p[0]));
  const ys = series.flatMap((sr) => sr.points.map((p) => p[1]).filter((y) => y != null));
  const xMin = opts.xMin ?? Math.min(...xs, 0);
  const xMax = Math.max(opts.xMax ?? Math.max(...xs, 1), xMin + 1e-9);
  const yMax = opts.yMax ?? niceMax(Math.max(...ys, 0));
  const iw = W - PAD.left - PAD.right;
  const ih = H - PAD.top - PAD.bottom;
  const x = (v) => PAD.left + ((v - xMin) / (xMax - xMin)) * iw;
  const y = (v) => PAD.top + ih - (v / yMax) * ih;
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('class', 'chart');
  clear(svg);
  for (const t of [0, 0.5, 1]) {
    const yy = y(t * yMax);
    svg.append(s('line', { x1: PAD.left, x2: W - PAD.right, y1: yy, y2: yy, class: 'grid' }));
    svg.append(s('text', { x: PAD.left - 6, y: yy + 4, class: 'tick', 'text-anchor': 'end' }, label(t * yMax)));
  }
  const fx = opts.xFormat || label;
  svg.append(s('text', { x: PAD.left, y: H - 6, class: 'tick' }, fx(xMin)));
  svg.append(s('text', { x: W - PAD.right, y: H - 6, class: 'tick', 'text-anchor': 'end' }, fx(xMax)));
  for (const sr of series) {
    let d = '';
    let pen = false;
    for (const [px, py] of sr.points) {
      if (py == null) { pen = false; continue; }
      d += `${pen ? 'L' : 'M'}${x(px).toFixed(1)},${y(py).toFixed(1)}`;
      pen = true;
    }
    if (d) svg.append(s('path', { d, class: `line ${sr.cls}` }));
    for (const [px, py] of sr.points) {
      if (py != null && sr.dots) svg.append(s('circle', { cx: x(px), cy: y(py), r: 3, class: `dot ${sr.cls}` }));
    }
  }
  const legend = s('g', { class: 'legend' });
  series.forEach((sr, i) => {
    const lx = PAD.left + 8 + i * 150;
    legend.append(s('rect', { x: lx, y: PAD.top, width: 10, height: 10, class: `swatch ${sr.cls}` }));
    legend.append(s('text', { x: lx + 14, y: PAD.top + 9, class: 'tick' }, sr.name));
  });
  svg.append(legend);
}

// parts: [{name, cls, value}]; one horizontal bar split by value, with a legend below.
export function stackedBar(svg, parts) {
  const W = widthOf(svg);
  const total = parts.reduce((a, p) => a + p.value, 0) || 1;
  const stacked = W / parts.length < 170; // narrow: one legend line per part
  svg.setAttribute('viewBox', `0 0 ${W} ${stacked ? 40 + 18 * parts.length : 60}`);
  svg.setAttribute('class', 'chart bar');
  clear(svg);
  let x0 = 0;
  parts.forEach((p, i) => {
    // A part in use stays visible (3 px) beside a huge free part; the last part takes the rest.
    const share = (p.value / total) * W;
    const w = i === parts.length - 1 ? W - x0 : Math.max(share, p.value > 0 ? 3 : 0);
    const rect = s('rect', { x: x0, y: 0, width: Math.max(w, 0), height: 28, class: `swatch ${p.cls}` });
    rect.append(s('title', {}, `${p.name}: ${p.value}`));
    svg.append(rect);
    x0 += w;
    const lx = stacked ? 0 : i * Math.min(190, W / parts.length);
    const ly = stacked ? 40 + 18 * i : 40;
    const pct = ((100 * p.value) / total).toFixed(p.value && p.value / total < 0.01 ? 2 : 0);
    svg.append(s('rect', { x: lx, y: ly, width: 10, height: 10, class: `swatch ${p.cls}` }));
    svg.append(s('text', { x: lx + 14, y: ly + 9, class: 'tick' }, `${p.name} ${p.value} (${pct}%)`));
  });
}
