// Line charts in plain SVG: drawChart(svg, [{name, color, dash, points: [[x, y], ...]}]). No library.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
  return +v.toPrecision(3) + "";
}

function drawChart(svg, series, opts) {
  opts = opts || {};
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 480, H = 240, L = 52, R = 12, T = 10, B = 28;
  const pts = series.flatMap(s => s.points);
  if (!pts.length) {
    svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, opts.empty || "no points yet"));
    return 0;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const axes = svgEl("g", {class: "axes"});
  for (const t of niceTicks(y0, y1, 4)) {
    axes.appendChild(svgEl("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    axes.appendChild(svgEl("text", {x: L - 6, y: sy(t) + 4, "text-anchor": "end"}, fmt(t)));
  }
  for (const t of niceTicks(x0, x1, 5).filter(t => Number.isInteger(t))) {
    axes.appendChild(svgEl("line", {x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "tick"}));
    axes.appendChild(svgEl("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}, t));
  }
  axes.appendChild(svgEl("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  axes.appendChild(svgEl("text", {x: W - R, y: H - 2, "text-anchor": "end", class: "xlabel"}, "step"));
  svg.appendChild(axes);
  let drawn = 0;
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const color = s.color || CHART_COLORS[i % CHART_COLORS.length];
    const g = svgEl("g", {class: "series", "data-name": s.name});
    g.appendChild(svgEl("polyline", {points: s.points.map(p => sx(p[0]) + "," + sy(p[1])).join(" "), fill: "none",
      stroke: color, "stroke-width": 2, "stroke-dasharray": s.dash || ""}));
    for (const p of s.points) {
      const c = svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.6, fill: color, class: "point"});
      c.appendChild(svgEl("title", {}, `${s.name}  step ${p[0]}: ${fmt(p[1])}`));
      g.appendChild(c);
      drawn++;
    }
    svg.appendChild(g);
  });
  return drawn;
}
