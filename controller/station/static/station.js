// ctcscan station: the pages' script (no build step). Every value from the
// server is put into the page as text (textContent), never as markup, except
// the focus picture, which the server renders with everything escaped.
"use strict";

const run = document.body.dataset.run || "";
const api = (path) => "/api/runs" + (run ? "/" + encodeURIComponent(run) : "") + path;
const $ = (id) => document.getElementById(id);

function text(el, value) {
  el.textContent = value === null || value === undefined ? "-" : String(value);
}

function el(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.appendChild(c);
  return e;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "-";
  const m = Math.floor(s / 60);
  return m ? `${m} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error((await r.json()).detail || r.statusText);
  return r.json();
}

async function postJSON(url, body) {
  const r = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = data.detail;
    throw new Error(Array.isArray(d) ? d.map((x) => `${x.loc.slice(-1)}: ${x.msg}`).join("; ") : d || r.statusText);
  }
  return data;
}

// ------------------------------------------------------------ overview

function overviewPage() {
  const body = $("runs").querySelector("tbody");
  async function refresh() {
    let rows;
    try { rows = await getJSON("/api/runs"); } catch (e) { return; }
    body.replaceChildren();
    $("empty").hidden = rows.length > 0;
    for (const r of rows) {
      const url = "/runs/" + encodeURIComponent(r.run);
      const link = el("a", { href: url, text: r.run });
      const fields = r.kind === "queue"
        ? `${r.cartridges.done} cartridges done`
        : `${r.fields.stored} / ${r.fields.planned} stored, ${r.fields.detected} detected`;
      const review = r.review ? `${r.review.state}${r.review.reviewed_count !== null && r.review.state === "signed" ? ": " + r.review.reviewed_count : ""}` : "";
      const action = el("td");
      if (r.kind === "queue" && r.state === "running") {
        const b = el("button", { type: "button", text: r.stop_requested ? "stop requested" : "stop after this cartridge" });
        b.disabled = r.stop_requested;
        b.addEventListener("click", async () => { await postJSON("/api/runs/" + encodeURIComponent(r.run) + "/stop", {}); refresh(); });
        action.appendChild(b);
      } else if (r.kind === "run" && r.review) {
        action.appendChild(el("a", { href: url + "/review", text: "review" }));
      }
      const tr = el("tr", { "data-run": r.run }, [
        el("td", {}, [link]), el("td", { text: r.cartridge_id }),
        el("td", {}, [el("span", { class: "state " + r.state, text: r.state })]),
        el("td", { text: fields }), el("td", { text: fmtSeconds(r.eta_s) }),
        el("td", { text: r.machine_count ?? "" }), el("td", { text: review }), action,
      ]);
      body.appendChild(tr);
    }
  }
  refresh();
  setInterval(refresh, 2000);
}

// ------------------------------------------------------------ one run, live

function runPage() {
  let lastShown = null, lastAt = 0, pendingLast = null, candAt = 0;
  const showLast = (name) => {
    const now = Date.now();
    if (now - lastAt < 2000) {  // at most one picture every two seconds
      clearTimeout(pendingLast);
      pendingLast = setTimeout(() => showLast(name), 2000 - (now - lastAt));
      return;
    }
    lastAt = now; lastShown = name;
    $("last").src = api("/pictures/last.png") + "?f=" + encodeURIComponent(name);
    text($("last-name"), name);
  };
  const showFocus = async () => {
    const r = await fetch(api("/pictures/focus.svg"), { credentials: "same-origin" });
    if (r.ok) $("focus-picture").innerHTML = await r.text();  // escaped by the server
  };
  const shown = new Set();
  const showCandidates = async () => {
    const now = Date.now();
    if (now - candAt < 2000) return;
    candAt = now;
    let data;
    try { data = await getJSON(api("/candidates")); } catch (e) { return; }
    const list = $("live-candidates");
    for (const c of data.candidates.filter((c) => c.label === "CTC")) {
      if (shown.has(c.object_id)) continue;  // each candidate's picture once
      shown.add(c.object_id);
      const img = el("img", { src: c.tiles.overlay, alt: c.object_id, width: "96", height: "96" });
      list.appendChild(el("li", {}, [img, el("span", { text: ` ${c.object_id} score ${c.score}` })]));
    }
  };
  const show = (s) => {
    text($("cartridge"), s.cartridge_id);
    const st = $("state"); st.className = "state " + s.state; text(st, s.state);
    const f = s.fields;
    $("progress").max = Math.max(f.planned, 1);
    $("progress").value = f.stored + f.failed;
    text($("fields"), `${f.stored} of ${f.planned} fields stored, ${f.failed} failed, ${f.detected} analysed`);
    text($("eta"), fmtSeconds(s.eta_s));
    text($("current"), s.current_field);
    text($("anchors"), `${s.focus.anchors_done} / ${s.focus.anchors_total || "?"}`);
    text($("machine"), s.machine_count);
    text($("reviewed"), s.reviewed_count !== null && s.reviewed_count !== undefined ? `reviewed and signed: ${s.reviewed_count}` : "");
    const err = $("error"); err.hidden = !s.error; text(err, s.error || "");
    const fl = $("failures"); fl.replaceChildren();
    const failed = Object.entries(s.failed).concat(Object.entries(s.detect_failed));
    for (const [name, why] of failed) fl.appendChild(el("li", { text: `${name}: ${why}` }));
    if (!failed.length) fl.appendChild(el("li", { text: "none" }));
    text($("refocused"), s.refocused.length ? s.refocused.join(", ") : "none");
    if (s.last_field && s.last_field !== lastShown) showLast(s.last_field);
  };
  getJSON(api("")).then(show).catch(() => {});
  showFocus(); showCandidates();
  const es = new EventSource(api("/events"));
  es.addEventListener("status", (e) => show(JSON.parse(e.data)));
  es.addEventListener("record", (e) => {
    const r = JSON.parse(e.data);
    if (r.event === "focus_map" || r.event === "finished" || r.event === "stopped") showFocus();
    if (r.event === "detected" && r.counts && r.counts.CTC) { candAt = 0; showCandidates(); }
    if (r.event === "finished") { candAt = 0; showCandidates(); }
  });
}

// ------------------------------------------------------------ queue

function queuePage() {
  const show = (s) => {
    const st = $("state"); st.className = "state " + s.state; text(st, s.state);
    text($("done"), s.cartridges.done);
    text($("current"), s.current_cartridge);
    $("stop").disabled = s.state !== "running" || s.stop_requested;
    text($("stop-state"), s.stop_requested ? "the queue stops after its current cartridge" : "");
    const body = $("cartridges").querySelector("tbody"); body.replaceChildren();
    for (const [bc, d] of Object.entries(s.done)) {
      body.appendChild(el("tr", {}, [el("td", { text: bc }), el("td", { text: d.slot }), el("td", { text: d.status }), el("td", { text: d.ctc_count ?? "" })]));
    }
  };
  $("stop").addEventListener("click", async () => { await postJSON(api("/stop"), {}); getJSON(api("")).then(show); });
  getJSON(api("")).then(show);
  const es = new EventSource(api("/events"));
  es.addEventListener("status", (e) => show(JSON.parse(e.data)));
}

// ------------------------------------------------------------ cartridge

function cartridgePage() {
  getJSON(api("/cartridge")).then((m) => {
    $("mosaic-img").src = api("/pictures/cartridge.png");
    const svg = $("marks");
    svg.setAttribute("viewBox", `0 0 ${m.width} ${m.height}`);
    const ns = "http://www.w3.org/2000/svg";
    for (const c of m.candidates) {
      const a = document.createElementNS(ns, "a");
      a.setAttribute("href", "/runs/" + encodeURIComponent(run) + "/review#" + encodeURIComponent(c.object_id));
      const circle = document.createElementNS(ns, "circle");
      circle.setAttribute("cx", c.x); circle.setAttribute("cy", c.y); circle.setAttribute("r", 4);
      circle.setAttribute("class", "mark " + (c.label === "CTC" ? "CTC" : "review"));
      circle.setAttribute("data-object", c.object_id);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${c.object_id}: ${c.label}${c.review ? " (review: " + c.review + ")" : ""}`;
      circle.appendChild(title); a.appendChild(circle); svg.appendChild(a);
    }
  });
}

// ------------------------------------------------------------ review

function scatter(objects, xKey, yKey, xLabel, yLabel, me, log) {
  const ns = "http://www.w3.org/2000/svg", W = 260, H = 200, P = 30;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "plot");
  const pts = objects.filter((o) => o[xKey] !== null && o[yKey] !== null);
  const tf = (v) => (log ? Math.log10(Math.max(v, 0.1)) : v);
  const xs = pts.map((o) => tf(o[xKey])), ys = pts.map((o) => tf(o[yKey]));
  const [x0, x1] = [Math.min(...xs, 0), Math.max(...xs, 1)], [y0, y1] = [Math.min(...ys, 0), Math.max(...ys, 1)];
  const sx = (v) => P + ((tf(v) - x0) / (x1 - x0 || 1)) * (W - P - 5);
  const sy = (v) => H - P - ((tf(v) - y0) / (y1 - y0 || 1)) * (H - P - 5);
  for (const o of pts) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", sx(o[xKey])); c.setAttribute("cy", sy(o[yKey])); c.setAttribute("r", 2);
    c.setAttribute("class", "dot " + o.label); svg.appendChild(c);
    if (o.object_id === me) {
      const m = document.createElementNS(ns, "circle");
      m.setAttribute("cx", sx(o[xKey])); m.setAttribute("cy", sy(o[yKey])); m.setAttribute("r", 7);
      m.setAttribute("class", "me"); m.setAttribute("data-object", me); svg.appendChild(m);
    }
  }
  const lab = (x, y, t, rot) => {
    const e = document.createElementNS(ns, "text");
    e.setAttribute("x", x); e.setAttribute("y", y); e.setAttribute("font-size", "10");
    if (rot) e.setAttribute("transform", `rotate(-90 ${x} ${y})`);
    e.textContent = t; svg.appendChild(e);
  };
  lab(P, H - 5, xLabel + (log ? " (log)" : "")); lab(10, H - P, yLabel + (log ? " (log)" : ""), true);
  return svg;
}

function reviewPage() {
  let reviewer = localStorage.getItem("ctcscan-reviewer") || "";
  let items = [], objects = [], index = 0, summary = null, busy = false;
  $("reviewer").value = reviewer;
  const say = (m) => text($("message"), m || "");

  async function load(keepIndex) {
    const q = reviewer ? "?reviewer=" + encodeURIComponent(reviewer) : "";
    const data = await getJSON(api("/candidates") + q);
    summary = data; objects = data.objects || [];
    items = data.candidates;
    const adjudicating = data.state === "adjudication" && reviewer && !data.readers.includes(reviewer) && data.readers.length === 2;
    if (adjudicating) items = items.filter((c) => c.disagreement);
    if (!keepIndex) {
      const wanted = decodeURIComponent(location.hash.slice(1));
      const at = items.findIndex((c) => c.object_id === wanted);
      index = at >= 0 ? at : Math.max(items.findIndex((c) => !c.decision), 0);
    }
    index = Math.min(index, Math.max(items.length - 1, 0));
    showSummary(data);
    show();
  }

  function showSummary(d) {
    const st = $("review-state"); st.className = "state " + d.state; text(st, d.state);
    let s = `Machine count ${d.machine_count}; ${d.candidates_total} candidates for review.`;
    if (d.reviewed_count !== null && d.reviewed_count !== undefined) s += ` Reviewed count ${d.reviewed_count}.`;
    if (d.kappa !== null && d.kappa !== undefined) s += ` Agreement ${(100 * d.agreement).toFixed(0)} %, Cohen's kappa ${d.kappa.toFixed(2)}.`;
    if (d.signoff) s += ` Signed by ${d.signoff.reviewer} at ${d.signoff.t}.`;
    text($("summary"), s);
    const t = $("progress-table"); t.replaceChildren(el("tr", {}, [el("th", { text: "reviewer" }), el("th", { text: "role" }), el("th", { text: "decided" })]));
    for (const [name, p] of Object.entries(d.progress || {})) {
      t.appendChild(el("tr", {}, [el("td", { text: name }), el("td", { text: p.role }), el("td", { text: `${p.done} / ${p.total}` })]));
    }
    text($("disagreements"), d.state === "adjudication" ? `Disagreements: ${d.disagreements.length}, waiting for the adjudicator: ${d.pending.length}` : "");
    $("sign").hidden = !d.ready_to_sign || !reviewer;
  }

  function show() {
    const c = items[index];
    $("candidate").hidden = !c || !reviewer;
    if (!c) return;
    const left = items.filter((x) => !x.decision).length;
    text($("position"), `${index + 1} of ${items.length}: ${c.object_id} (${c.label}${c.review ? ", borderline: " + c.review : ""})`);
    text($("left"), `· ${left} left`);
    const tiles = $("tiles"); tiles.replaceChildren();
    for (const [name, url] of Object.entries(c.tiles)) {
      tiles.appendChild(el("figure", {}, [el("img", { src: url, alt: name }), el("figcaption", { text: name })]));
    }
    const ft = $("features"); ft.replaceChildren();
    const rows = [["field", c.field], ["stage (um)", `${c.stage_x_um}, ${c.stage_y_um}`], ["machine", `${c.label}: ${c.reason}`], ["score", c.score]];
    for (const [k, v] of Object.entries(c.features)) rows.push([k, v]);
    for (const [k, v] of rows) ft.appendChild(el("tr", {}, [el("th", { text: k }), el("td", { text: v ?? "-" })]));
    const plots = $("plots"); plots.replaceChildren(
      scatter(objects, "ck_snr", "cd45_snr", "CK SNR", "CD45 SNR", c.object_id, true),
      scatter(objects, "ck_area_um2", "dapi", "CK area (um2)", "DAPI", c.object_id, true),
    );
    plots.appendChild(el("p", {}, [el("a", { href: "/runs/" + encodeURIComponent(run) + "/cartridge", text: "on the cartridge" })]));
    const others = c.readers ? Object.entries(c.readers).map(([n, d]) => `${n}: ${d}`).join(", ") : "";
    text($("others"), others ? `Readers: ${others}${c.adjudicated ? "; adjudicated: " + c.adjudicated : ""}` : "");
    for (const b of document.querySelectorAll("[data-decision]")) b.classList.toggle("decided", b.dataset.decision === c.decision);
    $("comment").value = "";
    history.replaceState(null, "", "#" + encodeURIComponent(c.object_id));
  }

  async function decide(decision) {
    const c = items[index];
    if (!c || busy) return;
    busy = true;
    try {
      await postJSON(api("/decisions"), { reviewer, object_id: c.object_id, decision, comment: $("comment").value });
      c.decision = decision; say("");
      const next = items.findIndex((x, i) => i > index && !x.decision);
      index = next >= 0 ? next : Math.min(index + 1, items.length - 1);
      await load(true);
    } catch (e) { say(e.message); } finally { busy = false; }
  }

  $("who").addEventListener("submit", (e) => {
    e.preventDefault();
    reviewer = $("reviewer").value.trim();
    localStorage.setItem("ctcscan-reviewer", reviewer);
    load(false).catch((err) => say(err.message));
  });
  for (const b of document.querySelectorAll("[data-decision]")) b.addEventListener("click", () => decide(b.dataset.decision));
  $("sign").addEventListener("click", async () => {
    try { await postJSON(api("/signoff"), { reviewer }); say(""); await load(true); } catch (e) { say(e.message); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement) return;
    const k = e.key;
    if (k === "y") decide("ctc");
    else if (k === "n") decide("not_ctc");
    else if (k === "u") decide("unsure");
    else if (k === "ArrowRight" || k === "ArrowDown") { index = Math.min(index + 1, items.length - 1); show(); }
    else if (k === "ArrowLeft" || k === "ArrowUp") { index = Math.max(index - 1, 0); show(); }
    else return;
    e.preventDefault();
  });
  load(false).catch((err) => say(err.message));
}

const pages = { overview: overviewPage, run: runPage, queue: queuePage, cartridge: cartridgePage, review: reviewPage };
(pages[document.body.dataset.page] || (() => {}))();
