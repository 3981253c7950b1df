"""The service's web page (`GET /`): one HTML file with inline CSS and JS, no build step and no
external assets (works offline). Pick or drop a photo, drag a box on it, choose k and SuperGlobal
re-ranking, see the top k as thumbnails with scores and paths; clicking a result searches with
it; errors are shown in the page. Names and paths are set with textContent, never as HTML.
"""

# Inline script and style only; images from this origin or the page's own blob: URLs.
CSP = (
  "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
  "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
  "frame-ancestors 'none'"
)


def html() -> bytes:
  return PAGE.encode('utf-8')


PAGE = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dolg_jax search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #222; }
  header { background: #23395d; color: #fff; padding: 10px 18px; display: flex; gap: 18px;
           align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  #info { font-size: 13px; opacity: .85; }
  main { display: flex; gap: 18px; padding: 16px; align-items: flex-start; }
  #side { width: 320px; flex: none; }
  #drop { border: 2px dashed #8a94a6; border-radius: 8px; padding: 14px; text-align: center;
          background: #fff; cursor: pointer; }
  #drop.over { border-color: #23395d; background: #eef2fa; }
  #preview-wrap { position: relative; margin-top: 10px; display: none; user-select: none; }
  #preview { width: 100%; display: block; image-rendering: auto; }
  #boxel { position: absolute; border: 2px solid #e4572e; background: rgba(228,87,46,.15);
           display: none; pointer-events: none; }
  .row { margin: 10px 0; display: flex; gap: 10px; align-items: center; font-size: 14px; }
  .row input[type=number] { width: 70px; }
  button { padding: 6px 14px; }
  #error { color: #b00020; background: #fde7ea; border: 1px solid #f3b3bd; padding: 8px;
           border-radius: 6px; display: none; white-space: pre-wrap; font-size: 14px; }
  #status { font-size: 13px; color: #555; min-height: 1em; }
  #qname { font-size: 13px; word-break: break-all; }
  #results { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
             gap: 10px; }
  .hit { background: #fff; border-radius: 6px; padding: 6px; box-shadow: 0 1px 2px #0002;
         cursor: pointer; }
  .hit:hover { outline: 2px solid #23395d; }
  .hit img { width: 100%; height: 130px; object-fit: contain; background: #eee; display: block; }
  .hit .score { font-weight: 600; font-size: 13px; margin-top: 4px; }
  .hit .path { font-size: 12px; color: #444; word-break: break-all; }
  #tokenrow { display: none; }
</style>
</head>
<body>
<header><h1>dolg_jax search</h1><span id="info"></span></header>
<main>
  <section id="side">
    <div id="drop" tabindex="0">Drop a photo here or click to pick one
      <input id="file" type="file" accept="image/*" hidden>
    </div>
    <div id="preview-wrap"><img id="preview" alt="query"><div id="boxel"></div></div>
    <div id="qname"></div>
    <div class="row">drag on the photo to search a region
      <button id="clearbox" type="button">no box</button></div>
    <div class="row"><label>k <input id="k" type="number" min="1" value="20"></label>
      <label><input id="rerank" type="checkbox"> SuperGlobal re-ranking</label></div>
    <div class="row" id="tokenrow"><label>token <input id="token" type="password"></label></div>
    <div class="row"><button id="go" type="button">Search</button></div>
    <div id="status"></div>
    <div id="error" role="alert"></div>
  </section>
  <section id="results"></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let query = null;       // {blob, name}
let box = null;         // [top, left, height, width] in image pixels
let urls = [];          // blob: URLs of the shown thumbnails

function headers() {
  const t = $("token").value || sessionStorage.getItem("dolg_token") || "";
  return t ? {"Authorization": "Bearer " + t} : {};
}
function showError(msg) {
  const e = $("error"); e.textContent = msg; e.style.display = msg ? "block" : "none";
}
async function api(url, opts) {
  const r = await fetch(url, Object.assign({headers: headers()}, opts || {}));
  if (r.status === 401) { $("tokenrow").style.display = "flex"; }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const j = await r.json(); if (j && j.error) msg = j.error; } catch (e) {}
    throw new Error(msg);
  }
  return r;
}
async function loadInfo() {
  try {
    const j = await (await api("/api/info")).json();
    $("info").textContent = j.images + " images, " + j.backend;
    $("k").max = j.max_k;
  } catch (e) { $("info").textContent = ""; }
}
function setQuery(blob, name) {
  query = {blob: blob, name: name};
  box = null; $("boxel").style.display = "none";
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  $("preview-wrap").style.display = "block";
  $("qname").textContent = name;
  search();
}
function clearResults() {
  urls.forEach((u) => URL.revokeObjectURL(u)); urls = []; $("results").replaceChildren();
}
async function search() {
  if (!query) { showError("pick a photo first"); return; }
  showError(""); $("status").textContent = "searching...";
  const fd = new FormData();
  fd.append("image", query.blob, query.name);
  fd.append("k", $("k").value || "20");
  fd.append("rerank", $("rerank").checked ? "superglobal" : "");
  if (box) fd.append("box", box.map((v) => Math.round(v)).join(","));
  const t0 = performance.now();
  try {
    const j = await (await api("/api/search", {method: "POST", body: fd})).json();
    render(j.queries[0].results);
    $("status").textContent = j.queries[0].results.length + " results in " +
        Math.round(performance.now() - t0) + " ms";
  } catch (e) { clearResults(); $("status").textContent = ""; showError(e.message); }
}
function render(results) {
  clearResults();
  const grid = $("results");
  for (const r of results) {
    const card = document.createElement("div"); card.className = "hit";
    card.dataset.id = String(r.id); card.dataset.path = r.path;
    const img = document.createElement("img"); img.alt = "";
    const score = document.createElement("div"); score.className = "score";
    score.textContent = r.score.toFixed(4);
    const path = document.createElement("div"); path.className = "path"; path.textContent = r.path;
    card.append(img, score, path); grid.append(card);
    api("/api/image/" + r.id + "?thumb=1").then((x) => x.blob()).then((b) => {
      const u = URL.createObjectURL(b); urls.push(u); img.src = u; }).catch(() => {});
    card.addEventListener("click", async () => {
      try { const b = await (await api("/api/image/" + r.id)).blob(); setQuery(b, r.path); }
      catch (e) { showError(e.message); }
    });
  }
}
// picking and dropping
$("drop").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (e) => {
  const f = e.target.files[0]; if (f) setQuery(f, f.name); e.target.value = "";
});
$("drop").addEventListener("dragover", (e) => {
  e.preventDefault(); $("drop").classList.add("over");
});
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault(); $("drop").classList.remove("over");
  const f = e.dataTransfer.files[0]; if (f) setQuery(f, f.name);
});
// dragging a box on the preview (display pixels -> image pixels)
(function () {
  const img = $("preview"), el = $("boxel"); let start = null;
  function pos(e) { const r = img.getBoundingClientRect();
    return [Math.min(Math.max(e.clientX - r.left, 0), r.width),
            Math.min(Math.max(e.clientY - r.top, 0), r.height)]; }
  img.addEventListener("mousedown", (e) => { e.preventDefault(); start = pos(e); });
  window.addEventListener("mousemove", (e) => {
    if (!start) return; const p = pos(e);
    const x = Math.min(p[0], start[0]), y = Math.min(p[1], start[1]);
    Object.assign(el.style, {display: "block", left: x + "px", top: y + "px",
      width: Math.abs(p[0] - start[0]) + "px", height: Math.abs(p[1] - start[1]) + "px"});
  });
  window.addEventListener("mouseup", (e) => {
    if (!start) return; const p = pos(e), s = start; start = null;
    const sx = img.naturalWidth / img.clientWidth, sy = img.naturalHeight / img.clientHeight;
    const x = Math.min(p[0], s[0]) * sx, y = Math.min(p[1], s[1]) * sy;
    const w = Math.abs(p[0] - s[0]) * sx, h = Math.abs(p[1] - s[1]) * sy;
    if (w < 4 || h < 4) { box = null; el.style.display = "none"; return; }
    box = [Math.floor(y), Math.floor(x), Math.min(Math.floor(h), img.naturalHeight - Math.floor(y)),
           Math.min(Math.floor(w), img.naturalWidth - Math.floor(x))];
    search();
  });
})();
$("clearbox").addEventListener("click", () => {
  box = null; $("boxel").style.display = "none"; if (query) search();
});
$("go").addEventListener("click", search);
$("rerank").addEventListener("change", () => { if (query) search(); });
$("token").addEventListener("change", () => {
  sessionStorage.setItem("dolg_token", $("token").value); loadInfo();
});
loadInfo();
</script>
</body>
</html>
'''
