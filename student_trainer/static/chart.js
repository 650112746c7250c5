// The trainer's live page: polls /status and draws each curve as SVG (no library, no CDN).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = { divergence: "#c0392b", eval: "#8e44ad", loss: "#2c3e50", tokens: "#16a085" };

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function draw(id, points, color) {
  const svg = document.getElementById(id);
  const width = svg.clientWidth || 400, height = svg.clientHeight || 180, pad = 34;
  svg.replaceChildren();
  const finite = points.filter(p => Number.isFinite(p.x) && Number.isFinite(p.y));
  svg.setAttribute("data-points", String(finite.length));
  if (!finite.length) return;
  const xs = finite.map(p => p.x), ys = finite.map(p => p.y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = x => pad + (x - x0) / (x1 - x0) * (width - pad - 8);
  const sy = y => height - 18 - (y - y0) / (y1 - y0) * (height - 28);
  svg.appendChild(el("line", { x1: pad, y1: height - 18, x2: width - 8, y2: height - 18, class: "axis" }));
  svg.appendChild(el("line", { x1: pad, y1: 6, x2: pad, y2: height - 18, class: "axis" }));
  for (const [y, text] of [[y0, y0.toPrecision(3)], [y1, y1.toPrecision(3)]]) {
    const label = el("text", { x: 2, y: sy(y) + 3, class: "label" });
    label.textContent = text;
    svg.appendChild(label);
  }
  const step = el("text", { x: width - 60, y: height - 4, class: "label" });
  step.textContent = "step " + x1;
  svg.appendChild(step);
  svg.appendChild(el("polyline", { class: "line", stroke: color,
    points: finite.map(p => sx(p.x) + "," + sy(p.y)).join(" ") }));
  for (const p of finite) {
    svg.appendChild(el("circle", { class: "point", cx: sx(p.x), cy: sy(p.y), r: 2.5, fill: color }));
  }
}

async function refresh() {
  try {
    const status = await (await fetch("/status", { cache: "no-store" })).json();
    const h = status.history || [];
    draw("chart-divergence", h.map(r => ({ x: r.step, y: r.mean_divergence })), COLORS.divergence);
    draw("chart-loss", h.map(r => ({ x: r.step, y: r.loss })), COLORS.loss);
    draw("chart-tokens", h.map(r => ({ x: r.step, y: r.tokens_per_s })), COLORS.tokens);
    draw("chart-eval", (status.evals || []).map(r => ({ x: r.step, y: r.divergence })), COLORS.eval);
    const t = status.step_time || {};
    document.getElementById("summary").textContent =
      `step ${status.step}/${status.max_steps} · policy v${status.policy_version} · ` +
      `${Math.round(status.tokens_per_s)} tok/s · teacher wait ${(t.teacher_wait_s || 0).toFixed(2)} s · ` +
      `data wait ${(t.data_wait_s || 0).toFixed(2)} s · compute ${(t.compute_s || 0).toFixed(2)} s`;
  } catch (err) {
    document.getElementById("summary").textContent = "trainer not reachable: " + err;
  }
}

refresh();
setInterval(refresh, 2000);
