"""The one HTML page (server-rendered: the config form comes from the schema here); `static/app.js` makes it
live. Four views: New run, Runs, Chat, Evaluate & export."""

from __future__ import annotations

from html import escape

from loraforge.webui.form import FormField, form_fields
from loraforge.webui.workspace import Workspace

SECTION_TITLES = {"model": "Model", "method": "Method", "data": "Data", "training": "Training",
                  "preference": "Preference tuning", "output": "Output"}
LAUNCH_KEYS = ("sharding",)  # config keys shown with the launch options instead of in their own section
PROCESSES_HELP = ("Not a config key: how many processes train this run. 1 = `loraforge train CONFIG`; N > 1 = "
                  "`torchrun --standalone --nproc_per_node N -m loraforge train CONFIG`, one process per GPU "
                  "(without CUDA: CPU processes over gloo). The batch per step grows N times (docs/TRAINING.md); "
                  "the estimate is per process; resume uses the same count.")


def _input(f: FormField) -> str:
    name = escape(f.name)
    if f.kind == "bool":
        checked = " checked" if f.default == "true" else ""
        return f'<input type="checkbox" id="f-{name}" name="{name}" data-kind="bool"{checked}>'
    if f.kind == "choice":
        options = "".join(f'<option{" selected" if c == f.default else ""}>{escape(c)}</option>' for c in f.choices)
        return f'<select id="f-{name}" name="{name}">{options}</select>'
    extra = ' list="model-list"' if f.name == "base_model" else ' list="data-list"' if f.name in (
        "metadata_path", "val_file") else ""
    return (f'<input type="text" id="f-{name}" name="{name}" value="{escape(f.default)}" '
            f'placeholder="{escape(f.default) or "(not set)"}" data-kind="{f.kind}"{extra} autocomplete="off">')


def _field(f: FormField) -> str:
    methods = escape(" ".join(f.methods))
    only = f' <span class="only">{escape(", ".join(f.methods))}</span>' if f.methods else ""
    return (f'<div class="field" data-field="{escape(f.name)}" data-methods="{methods}">'
            f'<label for="f-{escape(f.name)}"><code>{escape(f.name)}</code>{only}</label>{_input(f)}'
            f'<div class="help">{escape(f.description)}</div><div class="err" data-err="{escape(f.name)}"></div></div>')


def _form() -> str:
    out = []
    fields = form_fields()
    for section, title in SECTION_TITLES.items():
        own = [f for f in fields if f.section == section and f.name not in LAUNCH_KEYS]
        primary = "".join(_field(f) for f in own if f.primary)
        more = "".join(_field(f) for f in own if not f.primary)
        picker = ""
        if section == "model":
            picker = '<div class="picker"><label>pick a model <select id="model-pick"></select></label></div>'
        if section == "data":
            picker = ('<div class="picker"><label>pick a dataset <select id="data-pick"></select></label>'
                      '<div id="data-preview" class="preview"></div></div>')
        out.append(f'<fieldset data-section="{section}"><legend>{title}</legend>{picker}{primary}'
                   f'<details><summary>more {title.lower()} options</summary>{more}</details></fieldset>')
    launch = "".join(_field(f) for f in fields if f.name in LAUNCH_KEYS)
    out.append('<fieldset data-section="launch"><legend>Launch (several processes / GPUs)</legend>'
               '<div class="field" data-field="processes" data-methods=""><label for="f-processes"><code>processes'
               '</code></label><input type="number" id="f-processes" data-launch="processes" value="1" min="1" '
               f'step="1"><div class="help">{escape(PROCESSES_HELP)}</div><div class="err" data-err="processes">'
               f'</div></div>{launch}</fieldset>')
    return "".join(out)


def index(ws: Workspace) -> str:
    return PAGE.replace("{{FORM}}", _form()).replace("{{WORKSPACE}}", escape(str(ws.root)))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>loraforge</title><link rel="stylesheet" href="/static/style.css"></head>
<body>
<header><h1>loraforge</h1>
<nav><a href="#new" data-view="new">New run</a><a href="#runs" data-view="runs">Runs</a>
<a href="#chat" data-view="chat">Chat</a><a href="#evaluate" data-view="evaluate">Evaluate &amp; export</a></nav>
<span class="ws" title="workspace">{{WORKSPACE}}</span></header>
<datalist id="model-list"></datalist><datalist id="data-list"></datalist>

<main>
<section id="view-new" class="view">
 <div class="cols">
  <form id="config-form" autocomplete="off" onsubmit="return false">{{FORM}}</form>
  <aside class="side">
   <div class="card" id="start-card">
    <h2>Preflight</h2>
    <div id="check-status" class="status">checking…</div>
    <ul id="problems" class="problems"></ul>
    <div id="estimate" class="estimate"></div>
    <button id="start" class="primary" disabled>Start training</button>
    <div id="start-msg" class="msg"></div>
   </div>
   <div class="card">
    <h2>Config file</h2>
    <label>path in workspace <input id="config-path" type="text" value="configs/run.yaml"></label>
    <div class="buttons"><button id="save">Save</button><button id="download">Download</button>
     <label class="filebtn">Upload<input id="upload" type="file" accept=".yaml,.yml"></label></div>
    <div class="buttons"><select id="config-pick"><option value="">load a saved config…</option></select></div>
    <div class="cli"><span>equivalent command</span><code id="cli"></code></div>
    <pre id="yaml" class="yaml"></pre>
   </div>
  </aside>
 </div>
 <div class="card" id="tokens-card">
  <h2>What the model will learn</h2>
  <p class="legend"><span class="tok trained">trained</span> <span class="tok masked">masked (prompt, template)</span>
   <span class="tok trained special">end of turn</span> — the first rows exactly as training tokenizes them.</p>
  <div id="stats" class="stats"></div>
  <div id="tokens"></div>
 </div>
</section>

<section id="view-runs" class="view">
 <div class="card"><h2>Runs</h2>
  <table id="runs-table"><thead><tr><th title="overlay on the charts">compare</th><th>run</th><th>status</th>
   <th>step</th><th>ETA</th><th>tokens/s</th><th>loss</th><th></th></tr></thead><tbody></tbody></table>
 </div>
 <div class="card" id="run-detail">
  <h2 id="run-title">select a run</h2>
  <div class="buttons"><button id="run-stop">Stop (checkpoint)</button><button id="run-resume">Resume</button>
   <span id="run-msg" class="msg"></span></div>
  <div class="charts">
   <div class="chart-box"><h3>loss / val loss</h3><svg id="chart-loss" class="chart" viewBox="0 0 480 240"></svg></div>
   <div class="chart-box"><h3>learning rate</h3><svg id="chart-lr" class="chart" viewBox="0 0 480 240"></svg></div>
   <div class="chart-box"><h3>grad norm</h3><svg id="chart-grad" class="chart" viewBox="0 0 480 240"></svg></div>
  </div>
  <div id="chart-legend" class="chart-legend"></div>
  <h3>log</h3><pre id="run-log" class="log"></pre>
 </div>
</section>

<section id="view-chat" class="view">
 <div class="card"><h2>Chat and compare</h2>
  <div class="row"><label>base <input id="chat-base" type="text" value="smollm2" list="model-list"></label>
   <label>temperature <input id="chat-temp" type="number" value="0" min="0" step="0.1"></label>
   <label>top_p <input id="chat-top-p" type="number" value="1" min="0.01" max="1" step="0.05"></label>
   <label>max new tokens <input id="chat-max" type="number" value="48" min="1"></label></div>
  <div><span class="label">adapters (answer next to the base)</span><div id="chat-adapters" class="checks"></div></div>
  <label>system prompt <input id="chat-system" type="text" placeholder="(the template's default)"></label>
  <label>message <textarea id="chat-prompt" rows="2">What is your name?</textarea></label>
  <button id="chat-send" class="primary">Send to all</button>
  <div id="chat-answers" class="answers"></div>
 </div>
</section>

<section id="view-evaluate" class="view">
 <div class="cols2">
  <div class="card"><h2>Evaluate</h2>
   <label>test data <input id="eval-data" type="text" list="data-list" placeholder="examples/data/persona/heldout.jsonl"></label>
   <label>base <input id="eval-base" type="text" value="smollm2" list="model-list"></label>
   <span class="label">adapters</span><div id="eval-adapters" class="checks"></div>
   <div class="row"><label>only the first N rows <input id="eval-limit" type="number" min="1" value="8"></label>
    <label>max new tokens <input id="eval-max" type="number" min="1" value="48"></label></div>
   <button id="eval-start" class="primary">Run eval</button>
  </div>
  <div class="card"><h2>Export</h2>
   <label>run <select id="export-run"></select></label>
   <label>target <select id="export-to"></select></label>
   <div id="export-help" class="sub"></div>
   <label id="export-quant-box">GGUF type <select id="export-quant"></select></label>
   <label>output folder <input id="export-out" type="text" placeholder="exports/RUN-merge"></label>
   <button id="export-start" class="primary">Export</button>
  </div>
 </div>
 <div class="card" id="job-card"><h2 id="job-title">jobs</h2>
  <div id="job-progress" class="progress"><div class="bar"></div><span class="label"></span></div>
  <div id="job-eval"></div><ul id="job-files" class="files"></ul>
  <details id="job-report-box"><summary>Markdown report (eval_report.md)</summary><pre id="job-report" class="report"></pre></details>
  <pre id="job-log" class="log"></pre>
  <h3>recent jobs</h3><ul id="jobs-list" class="jobs"></ul></div>
</section>
</main>
<script src="/static/chart.js"></script>
<script src="/static/app.js"></script>
</body></html>
"""
