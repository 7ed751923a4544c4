// rdedge station page: plain JS, no build step, no CDN (a line box has no internet). Every state-changing call
// sends the session's CSRF token (meta csrf-token) in X-CSRF-Token and a JSON body.
"use strict";

const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

async function api(method, url, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(url, opts);
  if (r.status === 401 && location.pathname !== "/login") { location.href = "/login"; }
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) { throw new Error(doc.detail ? JSON.stringify(doc.detail) : r.statusText); }
  return doc;
}

function toast(text, bad) {
  const t = $("#toast");
  t.textContent = text;
  t.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ""; }, 4000);
}

const fmt = (v, d = 4) => (v === null || v === undefined ? "-" : typeof v === "number" ? v.toPrecision(d) : v);
const when = (ts) => new Date(ts * 1000).toLocaleString();
const el = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};

// -- login ----------------------------------------------------------------------------------------------------------
function initLogin() {
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/login", { user: $("#user").value, password: $("#password").value });
      location.href = "/live";
    } catch (e) { $("#login-error").textContent = e.message; }
  });
}

// -- live -----------------------------------------------------------------------------------------------------------
async function pollLive() {
  try {
    const d = await api("GET", "/api/live");
    const g = { model_id: d.model_id, threshold: fmt(d.threshold), broker: d.broker, p50: fmt(d.latency_ms.p50, 3),
      p99: fmt(d.latency_ms.p99, 3), spool_depth: d.spool_depth ?? "-", archive_dropped: d.archive.dropped };
    for (const [k, v] of Object.entries(g)) $$(`[data-g="${k}"]`).forEach((e) => { e.textContent = v; });
    for (const [name, c] of Object.entries(d.cameras)) {
      const card = $(`section.cam[data-camera="${name}"]`);
      if (!card) continue;
      const last = c.last || {};
      const f = { state: c.state, verdict: last.verdict || "-", score: fmt(last.score), threshold: fmt(last.threshold),
        seq: last.seq ?? "-", fps: c.fps, latency: last.latency_ms !== undefined ? `${last.latency_ms} ms` : "-",
        "shift.ok": c.shift.ok, "shift.ng": c.shift.ng, "shift.errors": c.shift.errors, "total.ok": c.total.ok,
        "total.ng": c.total.ng, "total.errors": c.total.errors };
      for (const [k, v] of Object.entries(f)) $$(`[data-f="${k}"]`, card).forEach((e) => { e.textContent = v; });
      $('[data-f="verdict"]', card).className = `verdict ${last.verdict || ""}`;
      $('[data-f="state"]', card).className = `state ${c.state}`;
      const img = $("img.live", card);
      if (c.image_seq !== null && img.dataset.seq !== String(c.image_seq)) {
        img.dataset.seq = String(c.image_seq);
        img.src = `/api/live/${encodeURIComponent(name)}.jpg?seq=${c.image_seq}`;
      }
    }
  } catch (e) { /* the next poll retries */ }
  setTimeout(pollLive, 500);
}

function initLive() {
  $$("button.reset").forEach((b) => b.addEventListener("click", async () => {
    try {
      await api("POST", "/api/counters/reset", { camera: b.dataset.camera, scope: b.dataset.scope });
      toast(`${b.dataset.camera}: shift counters reset`);
    } catch (e) { toast(e.message, true); }
  }));
  pollLive();
}

// -- archive --------------------------------------------------------------------------------------------------------
const LABELS = { false_reject: "false reject", confirmed_defect: "confirmed defect" };

async function loadArchive() {
  const q = new URLSearchParams();
  for (const k of ["camera", "verdict", "review"]) { const v = $(`#f-${k}`).value; if (v) q.set(k, v); }
  const d = await api("GET", `/api/archive?${q}`);
  $("#archive-info").textContent = `${d.items.length} shown · ${(d.bytes / 2 ** 20).toFixed(1)} of ` +
    `${(d.quota_bytes / 2 ** 20).toFixed(0)} MiB · ${d.dropped} dropped · ${d.deleted} deleted by the quota`;
  const grid = $("#archive");
  grid.replaceChildren();
  for (const m of d.items) {
    const card = el("figure", { class: `card item ${m.verdict}`, "data-name": m.name });
    card.append(el("img", { src: `/api/archive/${m.name}/jpg`, alt: m.name, loading: "lazy" }));
    const cap = el("figcaption");
    cap.append(el("b", {}, `${m.verdict} ${fmt(m.score)}`), el("span", {}, ` / ${fmt(m.threshold)} · ${m.camera} seq ${m.seq}`),
      el("br"), el("small", {}, `${when(m.ts)} · ${m.model_id}${m.trigger_id !== null ? " · trigger " + m.trigger_id : ""}`));
    const label = m.review ? m.review.label : null;
    cap.append(el("div", { class: "review" }, label ? `${LABELS[label]} (${m.review.by})` : "not reviewed"));
    for (const [k, text] of Object.entries(LABELS)) {
      const b = el("button", { type: "button", class: `mark ${k}`, "data-label": k }, text);
      b.addEventListener("click", async () => {
        try { await api("POST", `/api/archive/${m.name}/review`, { label: k }); toast(`${m.name}: ${text}`); loadArchive(); }
        catch (e) { toast(e.message, true); }
      });
      cap.append(b);
    }
    card.append(cap);
    grid.append(card);
  }
}

function initArchive() {
  const q = new URLSearchParams(location.search);  // /archive?verdict=NG&camera=cam1: a link to a filtered view
  for (const k of ["camera", "verdict", "review"]) { if (q.get(k)) $(`#f-${k}`).value = q.get(k); }
  $$("#filters select").forEach((s) => s.addEventListener("change", loadArchive));
  loadArchive();
}

// -- threshold ------------------------------------------------------------------------------------------------------
function drawHist(scores, good, value, lo, hi) {
  const c = $("#hist"), x = c.getContext("2d"), W = c.width, H = c.height, bins = 60;
  x.clearRect(0, 0, W, H);
  const count = (arr) => { const h = new Array(bins).fill(0); for (const s of arr) h[Math.min(bins - 1, Math.max(0, Math.floor((s - lo) / (hi - lo) * bins)))]++; return h; };
  const h = count(scores), hg = count(good), top = Math.max(1, ...h);
  for (let i = 0; i < bins; i++) {
    const left = lo + (i / bins) * (hi - lo);
    x.fillStyle = left >= value ? "#d9534f" : "#5cb85c";
    const bh = (h[i] / top) * (H - 20);
    x.fillRect((i / bins) * W, H - bh, W / bins - 1, bh);
    if (hg[i]) { x.fillStyle = "#1f6feb"; x.fillRect((i / bins) * W, H - 6, W / bins - 1, 6); }
  }
  x.fillStyle = "#111";
  x.fillRect(((value - lo) / (hi - lo)) * W - 1, 0, 2, H);
}

async function initThreshold() {
  const d = await api("GET", "/api/threshold");
  const all = d.scores.concat(d.reviewed.good, d.reviewed.defect, [d.threshold]);
  const min = Math.min(...all), max = Math.max(...all), pad = Math.max((max - min) * 0.15, Math.abs(max) * 0.01, 1e-9);
  const lo = min - pad, hi = max + pad;
  const s = $("#slider");
  s.min = lo; s.max = hi; s.value = d.threshold;
  $("#t-current").textContent = fmt(d.threshold);
  $("#t-bundle").textContent = fmt(d.bundle_threshold);
  const ov = d.override;
  $("#t-override").textContent = !ov ? "no override" : ov.error ? ov.error
    : ov.model_id && ov.model_id !== d.model_id ? `override by ${ov.by} is for model ${ov.model_id}: not in force`
    : `override by ${ov.by || "?"}`;
  const update = () => {
    const v = parseFloat(s.value);
    const ng = d.scores.filter((x) => x >= v).length, gng = d.reviewed.good.filter((x) => x >= v).length;
    $("#t-value").textContent = fmt(v);
    $("#p-frames").textContent = d.scores.length;
    $("#p-ok").textContent = d.scores.length - ng;
    $("#p-ng").textContent = ng;
    $("#p-good").textContent = d.reviewed.good.length;
    $("#p-good-ng").textContent = gng;
    $("#p-far").textContent = d.reviewed.good.length ? `${(100 * gng / d.reviewed.good.length).toFixed(1)} %` : "-";
    $("#p-defect-ok").textContent = d.reviewed.defect.filter((x) => x < v).length;
    drawHist(d.scores, d.reviewed.good, v, lo, hi);
  };
  s.addEventListener("input", update);
  update();
  $("#apply").addEventListener("click", async () => {
    try {
      const r = await api("POST", "/api/threshold", { value: parseFloat(s.value) });
      toast(`threshold ${fmt(r.old)} → ${fmt(r.new)} (the service applies it between two frames)`);
      $("#t-current").textContent = fmt(r.new);
    } catch (e) { toast(e.message, true); }
  });
}

// -- model hot swap -------------------------------------------------------------------------------------------------
async function loadModels() {
  const d = await api("GET", "/api/models");
  $("#m-id").textContent = d.model_id;
  $("#m-bundle").textContent = d.bundle;
  $("#m-previous").textContent = d.previous || "none";
  $("#m-state").textContent = d.state;
  $("#m-error").textContent = d.last_error || "";
  $("#rollback").disabled = !d.previous || d.state !== "idle";
  const body = $("#bundles tbody");
  body.replaceChildren();
  for (const b of d.bundles) {
    const tr = el("tr", { "data-name": b.name });
    tr.append(el("td", {}, b.name), el("td", {}, b.model_id || b.error), el("td", {}, fmt(b.threshold)), el("td", {}, b.input || ""));
    const td = el("td");
    if (b.model_id && b.model_id !== d.model_id) {
      const btn = el("button", { type: "button", class: "swap" }, "Swap in");
      btn.disabled = d.state !== "idle";
      btn.addEventListener("click", async () => {
        try { await api("POST", "/api/models/swap", { name: b.name }); toast(`verifying ${b.name}…`); loadModels(); }
        catch (e) { toast(e.message, true); }
      });
      td.append(btn);
    } else if (b.model_id === d.model_id) { td.textContent = "running"; }
    tr.append(td);
    body.append(tr);
  }
  if (d.state !== "idle") setTimeout(loadModels, 300);
}

function initModels() {
  $("#rollback").addEventListener("click", async () => {
    try { await api("POST", "/api/models/rollback"); toast("rolling back…"); loadModels(); }
    catch (e) { toast(e.message, true); }
  });
  loadModels();
  setInterval(loadModels, 3000);
}

// -- teach ----------------------------------------------------------------------------------------------------------
async function loadTeach() {
  const d = await api("GET", "/api/teach");
  $("#t-state").textContent = d.phase ? `${d.state} (${d.phase})` : d.state;
  $("#t-count").textContent = d.name ? `${d.collected} / ${d.target} frames of ${d.camera} in ${d.dataset}` +
    (d.dropped ? ` (${d.dropped} skipped: writer busy)` : "") : "";
  $("#t-error").textContent = d.error || "";
  const p = $("#t-progress");
  p.max = Math.max(1, d.target); p.value = d.collected;
  $("#t-commands").textContent = d.commands.join("\n");
  $("#t-log").textContent = d.log || "";
  $("#t-train").disabled = !["collected", "exported", "failed"].includes(d.state) || !d.collected;
  setTimeout(loadTeach, d.state === "collecting" || d.state === "training" ? 300 : 2000);
}

function initTeach() {
  $("#teach-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/teach/collect", { camera: $("#t-camera").value, n: parseInt($("#t-n").value, 10),
        interval_s: parseFloat($("#t-interval").value), name: $("#t-name").value });
      toast("collecting…");
    } catch (e) { toast(e.message, true); }
  });
  $("#t-cancel").addEventListener("click", async () => { try { await api("POST", "/api/teach/cancel"); } catch (e) { toast(e.message, true); } });
  $("#t-train").addEventListener("click", async () => {
    try { await api("POST", "/api/teach/train"); toast("training started at nice 19"); } catch (e) { toast(e.message, true); }
  });
  loadTeach();
}

// -- audit, users ---------------------------------------------------------------------------------------------------
async function initAudit() {
  const d = await api("GET", "/api/audit");
  const body = $("#audit tbody");
  for (const e of d.entries) {
    const tr = el("tr");
    for (const v of [when(e.ts), e.user, e.action, e.target ?? "", JSON.stringify(e.old), JSON.stringify(e.new), e.addr]) tr.append(el("td", {}, v));
    body.append(tr);
  }
}

async function loadUsers() {
  const d = await api("GET", "/api/users");
  const body = $("#users tbody");
  body.replaceChildren();
  for (const u of d.users) {
    const tr = el("tr");
    tr.append(el("td", {}, u.name), el("td", {}, u.role));
    const b = el("button", { type: "button" }, "delete");
    b.addEventListener("click", async () => { try { await api("DELETE", `/api/users/${encodeURIComponent(u.name)}`); loadUsers(); } catch (e) { toast(e.message, true); } });
    const td = el("td"); td.append(b); tr.append(td);
    body.append(tr);
  }
}

function initUsers() {
  $("#user-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/users", { name: $("#u-name").value, role: $("#u-role").value, password: $("#u-password").value });
      toast("saved"); loadUsers();
    } catch (e) { toast(e.message, true); }
  });
  loadUsers();
}

document.addEventListener("DOMContentLoaded", () => {
  const lo = $("#logout");
  if (lo) lo.addEventListener("click", async () => { await api("POST", "/api/logout").catch(() => {}); location.href = "/login"; });
  const init = { login: initLogin, live: initLive, archive: initArchive, threshold: initThreshold, audit: initAudit, users: initUsers, models: initModels, teach: initTeach };
  (init[document.body.dataset.page] || (() => {}))();
});
