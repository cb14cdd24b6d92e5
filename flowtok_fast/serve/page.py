"""GET /: one self-contained page (no external assets: the server may have no internet either).
It posts to /v1/images with format=json and shows the images, the options used and each stage's
time. Its initial steps / cfg / sampler are the model's recommended ones; with --api-key it has a
key box (the key goes in the Authorization header, never in the page)."""
import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flowtok-fast serve</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}
 textarea{width:100%;height:4rem} label{margin-right:1rem} input[type=number]{width:5rem}
 #images img{width:192px;height:192px;image-rendering:pixelated;margin:.25rem;border:1px solid #ccc}
 #error{color:#b00} table{border-collapse:collapse} td{padding:.1rem .6rem}
</style></head><body>
<h1>flowtok-fast</h1>
<form id="form">
 <textarea id="prompt" placeholder="a photo of a cat"></textarea><br>
 <label>steps <input id="steps" type="number" value="{steps}" min="1"></label>
 <label>cfg <input id="cfg" type="number" value="{cfg}" step="0.1"></label>
 <label>seed <input id="seed" type="number" value="0" min="0"></label>
 <label>images <input id="n" type="number" value="1" min="1"></label>
 <label>sampler <select id="sampler">{samplers}</select></label>
 {key_box}
 <button id="generate" type="submit">Generate</button>
</form>
<p id="status"></p><p id="error"></p>
<div id="images"></div>
<p id="options"></p>
<table id="timing"></table>
<script>
const $ = id => document.getElementById(id);
$("form").addEventListener("submit", async ev => {
  ev.preventDefault();
  $("error").textContent = ""; $("status").textContent = "generating...";
  const body = {prompt: $("prompt").value, steps: +$("steps").value, cfg: +$("cfg").value,
                seed: +$("seed").value, n: +$("n").value, sampler: $("sampler").value, format: "json"};
  const t0 = performance.now();
  try {
    const headers = {"Content-Type": "application/json"};
    if ($("key") && $("key").value) headers["Authorization"] = "Bearer " + $("key").value;
    const r = await fetch("/v1/images", {method: "POST", headers, body: JSON.stringify(body)});
    const data = await r.json();
    if (!r.ok) { $("status").textContent = ""; $("error").textContent = data.error.message; return; }
    $("images").replaceChildren(...data.images.map(b64 => {
      const img = document.createElement("img"); img.src = "data:image/png;base64," + b64;
      img.className = "result"; return img; }));
    const rows = Object.entries(data.timing_s).map(([k, v]) => `<tr><td>${k}</td><td>${(1000 * v).toFixed(1)} ms</td></tr>`);
    rows.push(`<tr><td>round trip</td><td>${(performance.now() - t0).toFixed(1)} ms</td></tr>`);
    $("timing").innerHTML = rows.join("");
    $("options").textContent = "used: " + Object.entries(data.options).map(([k, v]) => `${k} ${v}`).join(", ");
    const warn = r.headers.get("X-FlowTok-Warning");
    $("status").textContent = warn ? "warning: " + warn : "done";
  } catch (e) { $("status").textContent = ""; $("error").textContent = String(e); }
});
</script></body></html>
"""


KEY_BOX = '<label>API key <input id="key" type="password" autocomplete="off"></label>'


def page_html(defaults: dict, api_key: bool) -> str:
    """The page with the model's recommended options filled in."""
    samplers = "".join(f"<option{' selected' if m == defaults['sampler'] else ''}>{m}</option>" for m in ("euler", "heun"))
    return (PAGE.replace("{steps}", str(int(defaults["steps"]))).replace("{cfg}", html.escape(f"{defaults['cfg']:g}"))
            .replace("{samplers}", samplers).replace("{key_box}", KEY_BOX if api_key else ""))
