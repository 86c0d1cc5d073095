"""The upload page at ``/``: drop files, watch each job live, read each page's image beside its Markdown.

One self-contained document (no library, no CDN: it works on clusters without internet), kept in a module
so that it ships with the package without a package-data entry. It uses only the public API: ``POST
/v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/result?format=pages`` and the page images. With a
token, the page asks for it once (kept in the tab's sessionStorage) and sends it as a bearer header. The
kinds it names are the pipeline's (``olmocr.service.intake.accepted_names``).
"""

from olmocr.service.intake import accept_attribute, accepted_names

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>olmOCR: documents to Markdown</title>
<style>
  :root { font-family: system-ui, sans-serif; color: #1d232a; background: #f5f6f8; }
  body { margin: 0 auto; max-width: 1200px; padding: 1rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .8rem; }
  #drop { border: 2px dashed #8a94a6; border-radius: 10px; padding: 2rem; text-align: center; background: #fff;
          cursor: pointer; }
  #drop.over { border-color: #2f6fde; background: #eef4ff; }
  #token-box { display: none; margin: .8rem 0; }
  #token-box.shown { display: block; }
  .job { background: #fff; border-radius: 10px; padding: .8rem 1rem; margin: 1rem 0; box-shadow: 0 1px 3px #0002; }
  .job header { display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; }
  .state { font-weight: 600; }
  .state.done { color: #17803d; } .state.failed, .state.cancelled { color: #b42318; }
  .bar { height: 6px; background: #e4e7ec; border-radius: 3px; margin: .5rem 0; overflow: hidden; }
  .bar div { height: 100%; background: #2f6fde; width: 0; transition: width .3s; }
  .error { color: #b42318; }
  .page { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1rem; margin: .8rem 0;
          border-top: 1px solid #e4e7ec; padding-top: .8rem; }
  .page img { width: 100%; border: 1px solid #d0d5dd; }
  .page pre { white-space: pre-wrap; margin: 0; font-size: .85rem; }
  @media (max-width: 700px) { .page { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<h1>olmOCR: documents to Markdown</h1>
<div id="drop">Drop @KINDS@ files here, or click to choose them
  <input id="files" type="file" multiple accept="@ACCEPT@" hidden>
</div>
<div id="token-box">This service needs its token: <input id="token" type="password" size="40">
  <button id="token-save">Use it</button></div>
<div id="message" class="error"></div>
<div id="jobs"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const headers = () => {
  const token = sessionStorage.getItem("olmocr-service-token");
  return token ? {"Authorization": "Bearer " + token} : {};
};
async function call(path, options = {}) {
  const r = await fetch(path, {...options, headers: {...headers(), ...(options.headers || {})}});
  if (r.status === 401) { $("token-box").classList.add("shown"); }
  return r;
}
function say(text) { $("message").textContent = text; }
function element(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function uploadFiles(files) {
  say("");
  if (!files.length) return null;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const r = await call("/v1/jobs", {method: "POST", body: form});
  const body = await r.json();
  if (r.status !== 202) { say(body.error ? body.error.message : "the upload failed (" + r.status + ")"); return null; }
  const card = element("section", "job");
  card.dataset.id = body.id;
  const head = element("header");
  head.append(element("span", "name", [...files].map((f) => f.name).join(", ")), element("span", "state", body.state),
              element("span", "pages", ""));
  const bar = element("div", "bar");
  bar.append(element("div"));
  card.append(head, bar, element("div", "reasons error"), element("div", "result"));
  $("jobs").prepend(card);
  follow(card, body);
  return body.id;
}
function show(card, job) {
  const state = card.querySelector(".state");
  state.textContent = job.state;
  state.className = "state " + job.state;
  const eta = job.eta_seconds ? ", about " + Math.ceil(job.eta_seconds) + " s left" : "";
  card.querySelector(".pages").textContent = job.pages_done + " / " + job.pages_total + " pages" + eta;
  card.querySelector(".bar div").style.width = (job.pages_total ? 100 * job.pages_done / job.pages_total : 0) + "%";
  card.querySelector(".reasons").textContent =
    job.documents.filter((d) => d.reason).map((d) => d.name + ": " + d.reason).join("; ");
}
async function follow(card, job) {
  show(card, job);
  while (job.state === "queued" || job.state === "running") {
    await new Promise((resolve) => setTimeout(resolve, 700));
    const r = await call("/v1/jobs/" + job.id);
    if (r.ok) { job = await r.json(); show(card, job); }
  }
  const r = await call("/v1/jobs/" + job.id + "/result?format=pages");
  if (!r.ok) return;
  const result = await r.json();
  const out = card.querySelector(".result");
  for (const [n, doc] of result.documents.entries()) {
    for (const page of doc.pages || []) {
      const row = element("div", "page");
      const img = element("img");
      img.alt = doc.name + ", page " + page.page;
      row.append(img, element("pre", "markdown", page.text));
      out.append(row);
      const image = await call("/v1/jobs/" + job.id + "/documents/" + n + "/pages/" + page.page + "/image");
      if (image.ok) img.src = URL.createObjectURL(await image.blob());
    }
  }
  card.dataset.finished = "yes";
}
const drop = $("drop");
drop.addEventListener("click", () => $("files").click());
$("files").addEventListener("change", (e) => { uploadFiles(e.target.files); e.target.value = ""; });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); uploadFiles(e.dataTransfer.files); });
$("token-save").addEventListener("click", () => {
  sessionStorage.setItem("olmocr-service-token", $("token").value.trim());
  $("token-box").classList.remove("shown");
  say("token saved for this tab: drop the files again");
});
</script>
</body>
</html>
"""

#: Filled in once: the kinds the pipeline accepts, named and in the file chooser's filter.
PAGE = PAGE.replace("@KINDS@", accepted_names()).replace("@ACCEPT@", accept_attribute())
