// loraforge web UI: plain JS over the JSON API in loraforge/webui/routes.py. No framework, no build step.
"use strict";

const $ = (sel, root) => (root || document).querySelector(sel);
const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v; else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch("/api/" + path, opts);
  const data = await r.json().catch(() => ({error: "HTTP " + r.status}));
  if (!r.ok) { const e = new Error(data.error || "HTTP " + r.status); e.data = data; throw e; }
  return data;
}

function debounce(fn, ms) {
  let t = null;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}

// ------------------------------------------------------------------ views (hash routing: reload reattaches)
function showView() {
  const view = (location.hash || "#new").slice(1);
  $$(".view").forEach(v => v.classList.toggle("active", v.id === "view-" + view));
  $$("nav a").forEach(a => a.classList.toggle("active", a.dataset.view === view));
  if (view === "runs") refreshRuns();
  if (view === "chat" || view === "evaluate") refreshAdapters();
}
window.addEventListener("hashchange", showView);

// ------------------------------------------------------------------ new run: the form
const form = $("#config-form");

function formValues() {
  const out = {};
  for (const el of $$("[name]", form)) {
    if (el.closest(".field").classList.contains("hidden")) continue;  // another method's key
    out[el.name] = el.type === "checkbox" ? (el.checked ? "true" : "false") : el.value;
  }
  return out;
}

function setValues(values) {
  for (const el of $$("[name]", form)) {
    const def = el.type === "checkbox" ? null : el.getAttribute("value");
    if (el.type === "checkbox") el.checked = el.name in values ? values[el.name] === "true" : el.defaultChecked;
    else if (el.tagName === "SELECT") el.value = el.name in values ? values[el.name] : $("option[selected]", el)?.value ?? el.options[0].value;
    else el.value = el.name in values ? values[el.name] : (def || "");
  }
  const unknown = Object.keys(values).filter(k => !form.elements[k]);
  if (unknown.length) $("#start-msg").textContent = "not in the form (edit the YAML by hand): " + unknown.join(", ");
  methodFields();
  onChange();
}

function methodFields() {
  const method = form.elements.method.value;
  for (const f of $$(".field[data-methods]", form)) {
    const methods = f.dataset.methods.split(" ").filter(Boolean);
    f.classList.toggle("hidden", methods.length > 0 && !methods.includes(method));
  }
}

// launch options: not config keys (no `name`), sent next to the values
function processes() { return $("#f-processes").value; }

let checkSeq = 0, quickProblems = [], fullProblems = [], fullPending = true;

function showProblems() {
  $$(".err", form).forEach(e => { e.textContent = ""; e.closest(".field").classList.remove("bad"); });
  const list = $("#problems"); list.innerHTML = "";
  const all = quickProblems.length ? quickProblems : fullProblems;
  for (const p of all) {
    const text = `${p.where}: ${p.message}` + (p.value !== null ? ` (got ${p.value})` : "");
    const detail = [p.allowed ? "allowed: " + p.allowed : null, p.fix ? "fix: " + p.fix : null].filter(Boolean);
    const slot = $(`.err[data-err="${CSS.escape(p.key)}"]`, form);
    if (slot) {
      slot.append(h("div", {}, p.message + (p.value !== null ? ` (got ${p.value})` : "")),
                  ...detail.map(d => h("div", {class: d.startsWith("fix") ? "fix" : "allowed"}, d)));
      slot.closest(".field").classList.add("bad");
      slot.closest("details")?.setAttribute("open", "");
    }
    list.append(h("li", {}, h("b", {}, text), ...detail.map(d => h("div", {class: "sub"}, d))));
  }
  const start = $("#start");
  start.disabled = all.length > 0 || fullPending;
  $("#check-status").className = "status " + (all.length ? "bad" : fullPending ? "pending" : "ok");
  $("#check-status").textContent = all.length ? `${all.length} problem${all.length > 1 ? "s" : ""} — fix ${all.length > 1 ? "them" : "it"} to start`
    : fullPending ? "running preflight (model, data, estimate)…" : "preflight OK";
}

async function onChange() {
  const seq = ++checkSeq;
  const values = formValues();
  fullPending = true;
  let quick;
  try { quick = await api("check", {values, path: $("#config-path").value, processes: processes()}); } catch (e) { return; }
  if (seq !== checkSeq) return;
  quickProblems = quick.problems; fullProblems = [];
  $("#yaml").textContent = quick.yaml;
  $("#cli").textContent = quick.cli;
  showProblems();
  if (!quick.problems.length) fullCheck(seq, values);
  else { $("#estimate").innerHTML = ""; }
}

const fullCheck = debounce(async (seq, values) => {
  const [full] = await Promise.all([api("preflight", {values, processes: processes()}).catch(e => ({problems: [{key: "error", where: "error", message: e.message, value: null}]})),
                                    tokenView(seq, values)]);
  if (seq !== checkSeq) return;
  fullPending = false;
  fullProblems = full.problems || [];
  showProblems();
  showEstimate(full.estimate, full.stats);
}, 400);

function mib(b) { return (b / 2 ** 20).toLocaleString(undefined, {maximumFractionDigits: 0}) + " MiB"; }

function showEstimate(est, stats) {
  const box = $("#estimate"); box.innerHTML = "";
  if (est && !est.error) {
    const per = est.processes > 1 ? ` per process × ${est.processes} (${est.sharding})` : "";
    box.append(h("div", {}, h("b", {}, est.trainable_params.toLocaleString()), " trainable of ",
                 est.total_params.toLocaleString(), ` params (${est.trainable_percent}%)`),
               h("div", {}, "estimated peak memory ", h("b", {}, mib(est.peak_bytes)), per, ` · ${est.precision} on ${est.device}`),
               ...(est.notes || []).map(n => h("div", {class: "sub"}, n)));
  } else if (est && est.error) box.append(h("div", {class: "sub"}, est.error));
  const sbox = $("#stats"); sbox.innerHTML = "";
  if (stats) {
    const items = [["examples", stats.examples], ["trained tokens", stats.trained_tokens], ["tokens", stats.total_tokens],
                   [`over cutoff_len ${stats.cutoff_len}`, stats.over_cutoff], ["truncated", stats.truncated],
                   ["dropped", stats.dropped], ["length p50 / p90 / max", `${stats.p50} / ${stats.p90} / ${stats.max}`]];
    for (const [k, v] of items) sbox.append(h("span", {class: "stat" + (k.startsWith("over") && v > 0 ? " warn" : "")}, h("b", {}, v), " " + k));
  }
}

function tokenSpan(t) {
  const cls = "tok " + (t.trained ? "trained" : "masked") + (t.special ? " special" : "");
  const text = t.text.replace(/\n/g, "↵\n").replace(/ /g, "·");
  return h("span", {class: cls, title: (t.trained ? "trained" : "masked") + (t.special ? " · special token" : "")}, text || "∅");
}

async function tokenView(seq, values) {
  let view;
  try { view = await api("tokens", {values, rows: 3}); } catch (e) { return; }
  if (seq !== checkSeq) return;
  const box = $("#tokens"); box.innerHTML = "";
  if (view.note) box.append(h("p", {class: "sub"}, view.note));
  for (const p of view.problems || []) box.append(h("p", {class: "bad"}, `${p.where}: ${p.message}`));
  for (const row of view.rows) {
    box.append(h("div", {class: "token-row"},
      h("div", {class: "row-head"}, h("code", {}, row.source), ` ${row.length} tokens · `, h("b", {}, row.trained), " trained",
        row.truncated ? h("span", {class: "warn"}, ` · cut at cutoff_len ${view.cutoff_len}`) : ""),
      h("div", {class: "tokens"}, row.tokens.map(tokenSpan))));
  }
}

form.addEventListener("input", debounce(onChange, 250));
form.addEventListener("change", e => { if (e.target.name === "method") methodFields(); onChange(); });

// pickers
async function loadPickers() {
  const [models, data, configs] = await Promise.all([api("models"), api("datasets"), api("configs")]);
  const mp = $("#model-pick"); mp.innerHTML = "";
  mp.append(h("option", {value: ""}, "choose…"), ...models.map(m => h("option", {value: m.value}, `${m.label} [${m.kind}]`)));
  $("#model-list").replaceChildren(...models.map(m => h("option", {value: m.value})));
  const dp = $("#data-pick"); dp.innerHTML = "";
  dp.append(h("option", {value: ""}, "choose…"), ...data.map(d => h("option", {value: d.value}, d.label)));
  $("#data-list").replaceChildren(...data.map(d => h("option", {value: d.value})));
  const cp = $("#config-pick");
  cp.replaceChildren(h("option", {value: ""}, "load a saved config…"), ...configs.map(c => h("option", {value: c}, c)));
}

$("#model-pick").addEventListener("change", e => { if (e.target.value) { form.elements.base_model.value = e.target.value; onChange(); } });
$("#data-pick").addEventListener("change", e => { if (e.target.value) { form.elements.metadata_path.value = e.target.value; previewData(); onChange(); } });
form.elements.metadata_path.addEventListener("change", previewData);

async function previewData() {
  const box = $("#data-preview"); box.innerHTML = "";
  const path = form.elements.metadata_path.value;
  if (!path) return;
  try {
    const r = await api("dataset/preview?path=" + encodeURIComponent(path));
    box.append(h("div", {class: "sub"}, `first ${r.rows.length} rows of ${path}`),
               ...r.rows.map(row => h("pre", {class: "row"}, JSON.stringify(row))));
  } catch (e) { box.append(h("div", {class: "bad"}, e.message)); }
}

// config file
$("#save").addEventListener("click", async () => {
  try {
    const r = await api("config/save", {values: formValues(), path: $("#config-path").value});
    $("#start-msg").textContent = "saved " + r.path; $("#cli").textContent = r.cli; loadPickers();
  } catch (e) { $("#start-msg").textContent = e.message; }
});
$("#download").addEventListener("click", () => {
  const blob = new Blob([$("#yaml").textContent], {type: "application/x-yaml"});
  const a = h("a", {href: URL.createObjectURL(blob), download: ($("#config-path").value.split("/").pop() || "config.yaml")});
  document.body.append(a); a.click(); a.remove();
});
$("#upload").addEventListener("change", async e => {
  const file = e.target.files[0]; if (!file) return;
  try { setValues((await api("config/parse", {yaml: await file.text()})).values); $("#config-path").value = "configs/" + file.name; }
  catch (err) { $("#start-msg").textContent = err.message; }
});
$("#config-pick").addEventListener("change", async e => {
  if (!e.target.value) return;
  try { setValues((await api("config/load?path=" + encodeURIComponent(e.target.value))).values); $("#config-path").value = e.target.value; }
  catch (err) { $("#start-msg").textContent = err.message; }
});

$("#start").addEventListener("click", async () => {
  $("#start").disabled = true;
  try {
    const r = await api("train", {values: formValues(), path: $("#config-path").value, processes: processes()});
    $("#start-msg").textContent = `started ${r.cli}`;
    localStorage.setItem("loraforge.run", r.dir);
    selectedRun = r.dir;
    location.hash = "#runs";
  } catch (e) {
    $("#start-msg").textContent = e.message;
    if (e.data && e.data.problems) { fullProblems = e.data.problems; showProblems(); }
  }
});

// ------------------------------------------------------------------ runs
let selectedRun = localStorage.getItem("loraforge.run") || null;
const compared = new Set(JSON.parse(localStorage.getItem("loraforge.compare") || "[]"));
let runsTimer = null;

async function refreshRuns() {
  clearTimeout(runsTimer);
  if (!$("#view-runs").classList.contains("active")) return;
  let runs = [];
  try { runs = await api("runs"); } catch (e) { /* server restarting: try again */ }
  const body = $("#runs-table tbody"); body.innerHTML = "";
  if (!selectedRun && runs.length) selectedRun = runs[0].dir;
  for (const r of runs) {
    const box = h("input", {type: "checkbox", checked: compared.has(r.dir), onchange: e => {
      e.target.checked ? compared.add(r.dir) : compared.delete(r.dir);
      localStorage.setItem("loraforge.compare", JSON.stringify([...compared])); refreshDetail(); }});
    const step = r.step === undefined || r.step === null ? "" : r.total_steps ? `${r.step}/${r.total_steps}` : r.step;
    body.append(h("tr", {class: r.dir === selectedRun ? "selected" : "", "data-run": r.dir, onclick: e => {
      if (e.target.tagName === "INPUT") return; selectedRun = r.dir; localStorage.setItem("loraforge.run", r.dir); refreshRuns(); }},
      h("td", {}, box), h("td", {}, h("code", {}, r.dir), r.processes > 1 ? h("span", {class: "sub"}, ` × ${r.processes} processes`) : ""), h("td", {}, h("span", {class: "badge " + r.status}, r.status)),
      h("td", {}, step), h("td", {}, r.status === "running" ? (r.eta || "") : ""),
      h("td", {}, r.tokens_per_s ? Math.round(r.tokens_per_s) : ""), h("td", {}, r.loss ? r.loss.toFixed(4) : ""),
      h("td", {}, r.checkpoints ? `${r.checkpoints} ckpt` : "")));
  }
  await refreshDetail(runs.find(r => r.dir === selectedRun));
  const anyRunning = runs.some(r => r.status === "running");
  runsTimer = setTimeout(refreshRuns, anyRunning ? 1500 : 5000);
}

async function refreshDetail(run) {
  if (!selectedRun) return;
  let info;
  try { info = await api("run?dir=" + encodeURIComponent(selectedRun)); } catch (e) { $("#run-title").textContent = e.message; return; }
  $("#run-title").replaceChildren(h("code", {}, info.dir), " ", h("span", {class: "badge " + info.status}, info.status),
    info.step !== undefined ? ` step ${info.step}${info.total_steps ? "/" + info.total_steps : ""}` : "",
    info.status === "running" && info.eta ? ` · ETA ${info.eta}` : "",
    info.tokens_per_s ? ` · ${Math.round(info.tokens_per_s)} tokens/s` : "",
    info.processes > 1 ? ` · ${info.processes} processes` : "");
  $("#run-stop").disabled = info.status !== "running";
  $("#run-resume").disabled = info.status === "running" || !info.checkpoints || info.status === "finished";
  const log = $("#run-log"); const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  log.textContent = info.log || "(no log: started outside the UI)";
  if (atEnd) log.scrollTop = log.scrollHeight;
  const dirs = [selectedRun, ...[...compared].filter(d => d !== selectedRun)];
  const metrics = await api("metrics?" + dirs.map(d => "dir=" + encodeURIComponent(d)).join("&")).catch(() => ({}));
  const series = (key, dash) => dirs.map((d, i) => ({name: `${d} ${key}`, color: CHART_COLORS[i % CHART_COLORS.length], dash,
    points: (metrics[d] || []).filter(m => typeof m[key] === "number").map(m => [m.step, m[key]])}));
  drawChart($("#chart-loss"), [...series("loss"), ...series("val_loss", "5 4")]);
  drawChart($("#chart-lr"), series("lr"));
  drawChart($("#chart-grad"), series("grad_norm"));
  $("#chart-legend").replaceChildren(...dirs.map((d, i) => h("span", {}, h("i", {style: `background:${CHART_COLORS[i % CHART_COLORS.length]}`}), d)),
    h("span", {class: "sub"}, "solid: train loss · dashed: val loss"));
}

$("#run-stop").addEventListener("click", async () => {
  try { await api("run/stop", {dir: selectedRun}); $("#run-msg").textContent = "stopping: a checkpoint is written at the end of this step"; }
  catch (e) { $("#run-msg").textContent = e.message; }
  refreshRuns();
});
$("#run-resume").addEventListener("click", async () => {
  try { await api("run/resume", {dir: selectedRun}); $("#run-msg").textContent = "resumed from the latest checkpoint"; }
  catch (e) { $("#run-msg").textContent = e.message; }
  refreshRuns();
});

// ------------------------------------------------------------------ chat and compare
async function refreshAdapters() {
  const runs = await api("runs").catch(() => []);
  const withWeights = runs.filter(r => r.status !== "failed");
  for (const id of ["#chat-adapters", "#eval-adapters"]) {
    const box = $(id); const was = new Set($$("input:checked", box).map(i => i.value));
    box.replaceChildren(...withWeights.map(r => h("label", {class: "check"},
      h("input", {type: "checkbox", value: r.dir, checked: was.has(r.dir)}), h("code", {}, r.dir), ` (${r.status})`)));
    if (!withWeights.length) box.append(h("span", {class: "sub"}, "no runs yet"));
  }
  const was = $("#export-run").value;
  $("#export-run").replaceChildren(...runs.filter(r => r.status === "finished").map(r => h("option", {value: r.dir, selected: r.dir === was}, r.dir)));
  exportTarget();
  refreshJobs();
}

$("#chat-send").addEventListener("click", async () => {
  const adapters = $$("#chat-adapters input:checked").map(i => i.value);
  const answers = $("#chat-answers"); answers.innerHTML = "";
  const cols = {};
  for (const name of ["base", ...adapters]) {
    cols[name] = h("div", {class: "answer-text"});
    answers.append(h("div", {class: "answer", "data-variant": name}, h("h3", {}, name === "base" ? "base" : name), cols[name]));
  }
  $("#chat-send").disabled = true;
  const variants = ["base", ...adapters];
  const seen = [];
  try {
    const r = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({
      base: $("#chat-base").value, adapters, prompt: $("#chat-prompt").value, system: $("#chat-system").value,
      settings: {temperature: $("#chat-temp").value, top_p: $("#chat-top-p").value, max_new_tokens: $("#chat-max").value}})});
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const msg = JSON.parse(buf.slice(0, nl)); buf = buf.slice(nl + 1);
        if (msg.error && !msg.variant) { answers.append(h("pre", {class: "bad"}, msg.error)); continue; }
        if (!seen.includes(msg.variant)) seen.push(msg.variant);
        const col = cols[variants[seen.indexOf(msg.variant)]];
        if (!col) continue;
        if (msg.delta) col.append(msg.delta);
        if (msg.error) col.append(h("div", {class: "bad"}, msg.error));
        if (msg.done) col.closest(".answer").classList.add("done");
      }
    }
  } catch (e) { answers.append(h("div", {class: "bad"}, e.message)); }
  $("#chat-send").disabled = false;
});

// ------------------------------------------------------------------ evaluate and export
let jobTimer = null, exportInfo = {targets: [], quant_targets: [], quants: []};

function fmtNum(v, signed) {
  if (v === null || v === undefined) return "–";
  return (signed && v > 0 ? "+" : "") + v.toFixed(3);
}

function evalTable(ev) {
  const adapters = ev.variants.slice(1);
  const head = h("tr", {}, h("th", {}, "metric"), ...ev.variants.map(v => h("th", {}, v)), ...adapters.map(a => h("th", {}, "Δ " + a)));
  const rows = ev.metrics.map(m => h("tr", {},
    h("td", {}, m.label, h("span", {class: "sub"}, m.lower_is_better ? " ↓" : " ↑")),
    ...ev.variants.map(v => h("td", {class: "num" + (v === m.best && ev.variants.length > 1 ? " best" : "")}, fmtNum(m.values[v]))),
    ...adapters.map(a => {
      const d = m.deltas[a];
      const better = d === null || d === undefined || d === 0 ? "" : (m.lower_is_better ? d < 0 : d > 0) ? " up" : " down";
      return h("td", {class: "num delta" + better}, fmtNum(d, true));
    })));
  const examples = ev.examples.map(ex => h("tr", {}, h("td", {}, ex.prompt), h("td", {}, ex.references.join(" / ")),
    ...ev.variants.map(v => h("td", {}, ex.outputs[v]))));
  return [h("p", {class: "sub"}, `${ev.n_examples} examples of ${ev.data} · Δ = adapter − base; green: better than the base`),
          h("table", {class: "eval"}, h("thead", {}, head), h("tbody", {}, rows)),
          h("h3", {}, `first ${ev.examples.length} examples`),
          h("table", {class: "eval examples"}, h("thead", {}, h("tr", {}, h("th", {}, "prompt"), h("th", {}, "reference"), ...ev.variants.map(v => h("th", {}, v)))),
            h("tbody", {}, examples))];
}

function kib(b) { return b >= 2 ** 20 ? mib(b) : (b / 1024).toFixed(1) + " KiB"; }

async function watchJob(id) {
  clearTimeout(jobTimer);
  const job = await api("job?id=" + id).catch(e => ({log: e.message}));
  const state = job.running ? "running" : job.exit_code === 0 ? "finished" : job.exit_code !== undefined && job.exit_code !== null ? "failed" : "";
  const secs = job.started ? Math.round(((job.ended || Date.now() / 1000) - job.started)) : null;
  $("#job-title").replaceChildren(`${job.kind || "job"} → `, h("code", {}, job.target || ""), " ",
    state ? h("span", {class: "badge " + state}, state + (state === "failed" ? ` (exit ${job.exit_code})` : "")) : "",
    secs !== null ? h("span", {class: "sub"}, ` ${secs} s`) : "");
  const bar = $("#job-progress");
  bar.style.display = job.running ? "" : "none";
  bar.classList.toggle("indeterminate", job.running && !job.progress);
  $(".bar", bar).style.width = job.progress ? job.progress.percent + "%" : "30%";
  $(".label", bar).textContent = job.progress ? `${job.progress.percent}% · ${job.progress.label}` : "working…";
  const log = $("#job-log"); log.textContent = job.log || ""; log.scrollTop = log.scrollHeight;
  $("#job-report").textContent = job.report || "";
  $("#job-report-box").style.display = job.report ? "" : "none";
  $("#job-eval").replaceChildren(...(job.eval ? evalTable(job.eval) : []));
  $("#job-files").replaceChildren(...(job.files || []).map(f => h("li", {}, h("code", {}, f.name), " ", h("span", {class: "sub"}, kib(f.bytes)))));
  if (job.running) jobTimer = setTimeout(() => watchJob(id), 1000);
  else refreshJobs();
}

async function refreshJobs() {
  const jobs = await api("jobs").catch(() => []);
  $("#jobs-list").replaceChildren(...jobs.filter(j => j.kind !== "train").reverse().map(j => h("li", {onclick: () => watchJob(j.id)},
    h("code", {}, j.kind), " → ", h("code", {}, j.target), " ",
    h("span", {class: "badge " + (j.running ? "running" : j.exit_code === 0 ? "finished" : "failed")}, j.running ? "running" : j.exit_code === 0 ? "done" : "failed"))));
}

function exportTarget() {
  const to = $("#export-to").value;
  const t = exportInfo.targets.find(t => t.name === to);
  $("#export-help").textContent = t ? t.help : "";
  $("#export-quant-box").style.display = exportInfo.quant_targets.includes(to) ? "" : "none";
  const run = ($("#export-run").value || "RUN").split("/").pop();
  $("#export-out").placeholder = `exports/${run}-${to}`;
}
$("#export-to").addEventListener("change", exportTarget);
$("#export-run").addEventListener("change", exportTarget);

$("#eval-start").addEventListener("click", async () => {
  try {
    const r = await api("eval", {data: $("#eval-data").value || $("#eval-data").placeholder, base: $("#eval-base").value,
      adapters: $$("#eval-adapters input:checked").map(i => i.value), limit: $("#eval-limit").value, max_new_tokens: $("#eval-max").value});
    watchJob(r.job);
  } catch (e) { $("#job-log").textContent = e.message; }
});
$("#export-start").addEventListener("click", async () => {
  try {
    const to = $("#export-to").value;
    const r = await api("export", {dir: $("#export-run").value, to, out: $("#export-out").value || null,
      quant: exportInfo.quant_targets.includes(to) ? $("#export-quant").value : null});
    watchJob(r.job);
  } catch (e) { $("#job-log").textContent = e.message; }
});

(async function init() {
  exportInfo = await api("exports").catch(() => ({targets: [{name: "merge", help: ""}], quant_targets: [], quants: []}));
  $("#export-to").replaceChildren(...exportInfo.targets.map(t => h("option", {value: t.name, title: t.help}, t.name)));
  $("#export-quant").replaceChildren(...exportInfo.quants.map(q => h("option", {value: q}, q)));
  exportTarget();
  methodFields();
  showView();
  await loadPickers().catch(() => {});
  onChange();
})();
