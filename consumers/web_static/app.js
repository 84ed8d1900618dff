// trainbus web: the live page. Every string that came off the bus is set with textContent
// (never as HTML markup), so a run name or alert summary holding markup renders as text.
// Numbers arrive as JSON; non-finite ones as the strings "nan", "inf", "-inf".
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const BENCH = params.has("bench");
  // For the bench and the tests: event ts -> on screen (next animation frame after the DOM
  // and canvas update), in seconds, on this machine's clock.
  const stats = { latencies: [], serverLatencies: [], messages: 0, inits: 0, rowsUpdated: 0 };
  window.trainbus = stats;

  const SPARK_METRICS = ["grad_norm", "pre_clip_grad_norm"];
  const COLUMNS = [
    ["grad_norm", 3], ["spark:grad_norm"], ["pre_clip_grad_norm", 3], ["spark:pre_clip_grad_norm"],
    ["approx_kl", 4], ["clip_fraction", 3], ["entropy", 3], ["explained_variance", 2],
    ["episode_return_mean", 1],
  ];
  const STATUS_CLASS = (s) => "s-" + s;
  const BANNER_CLASS = (s) => "banner b-" + String(s).replace(/\W+/g, "-");
  const COLORS = { ok: "#3fb950", warning: "#d29922", critical: "#f85149", nonfinite: "#f85149",
                   unknown: "#6b7785", "": "#9aa7b4" };

  let config = { max_rows: 48, worst_n: 16, stale_after: 5, history: 600 };
  let clockOffset = 0; // server wall clock minus ours (seconds)
  const rows = new Map(); // id -> {data, tr, cells}
  const runs = new Map(); // run -> {tbody, fleetTr, distTr, moreTr, fleet}
  let alerts = [];
  let chart = null; // {id, metric, points: [], byIndex: Set}

  function val(x) {
    if (x === "nan") return NaN;
    if (x === "inf") return Infinity;
    if (x === "-inf") return -Infinity;
    return x;
  }
  function fmt(x, digits, smallExp) {
    x = val(x);
    if (x === null || x === undefined) return "–";
    if (Number.isNaN(x)) return "NaN";
    if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
    if (Math.abs(x) >= 1e5 || (smallExp && x !== 0 && Math.abs(x) < Math.pow(10, -digits))) {
      return x.toExponential(2);
    }
    return x.toFixed(digits);
  }
  function fmtAge(s) {
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + "s";
    if (s < 60) return Math.round(s) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }
  function serverNow() { return Date.now() / 1000 + clockOffset; }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ------------------------------------------------------------------ sparklines

  // The console's 10 cells: level 0..7 a block, -1 padding, -2 non-finite (red cross).
  function drawSpark(canvas, levels, health) {
    const dpr = window.devicePixelRatio || 1;
    const w = 90, h = 16;
    if (canvas.width !== w * dpr) { canvas.width = w * dpr; canvas.height = h * dpr; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const cw = w / 10;
    let nonfinite = 0;
    for (let i = 0; i < levels.length; i++) {
      const level = levels[i];
      const x = i * cw;
      if (level === -1) continue;
      if (level === -2) {
        nonfinite++;
        ctx.strokeStyle = COLORS.critical;
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.moveTo(x + 2, 2); ctx.lineTo(x + cw - 2, h - 2);
        ctx.moveTo(x + cw - 2, 2); ctx.lineTo(x + 2, h - 2);
        ctx.stroke();
        continue;
      }
      const bh = Math.max(2, ((level + 1) / 8) * h);
      ctx.fillStyle = COLORS[health] || COLORS[""];
      ctx.fillRect(x + 1, h - bh, cw - 2, bh);
    }
    canvas.dataset.nonfinite = String(nonfinite);
    canvas.dataset.cells = levels.join(",");
  }

  // ------------------------------------------------------------------ rows

  function runEntry(run) {
    let entry = runs.get(run);
    if (entry) return entry;
    const tbody = el("tbody", "run");
    tbody.dataset.run = run;
    const fleetTr = el("tr", "fleet");
    fleetTr.dataset.run = run;
    const cells = {};
    for (const key of ["worker", "grad_norm", "spark", "pre_clip_grad_norm", "prespark", "approx_kl",
      "clip_fraction", "entropy", "explained_variance", "episode_return_mean", "update", "age",
      "dropped", "status"]) {
      const td = el("td", key === "worker" ? "c-worker" : (key === "status" || key.endsWith("spark") ? "c-spark" : ""));
      fleetTr.appendChild(td);
      cells[key] = td;
    }
    cells.worker.textContent = "Σ " + run;
    tbody.appendChild(fleetTr);
    const distTr = el("tr", "dist");
    const distTd = el("td");
    distTd.colSpan = 14;
    distTr.appendChild(distTd);
    const moreTr = el("tr", "more");
    const moreTd = el("td");
    moreTd.colSpan = 14;
    moreTr.appendChild(moreTd);
    entry = { run, tbody, fleetTr, fleetCells: cells, distTr, distTd, moreTr, moreTd, fleet: null };
    runs.set(run, entry);
    // Runs in name order.
    const grid = $("grid");
    const after = [...runs.keys()].sort().filter((r) => r > run)[0];
    grid.insertBefore(tbody, after ? runs.get(after).tbody : null);
    $("empty").hidden = true;
    return entry;
  }

  function makeRow(data) {
    const tr = el("tr", "worker");
    tr.dataset.id = data.id;
    tr.dataset.run = data.run;
    tr.dataset.worker = String(data.worker);
    const cells = {};
    const add = (key, cls) => { const td = el("td", cls || ""); tr.appendChild(td); cells[key] = td; return td; };
    const w = add("worker", "c-worker");
    w.appendChild(el("span", "wid", "  " + data.worker));
    cells.restart = w.appendChild(el("span", "restart"));
    for (const [key] of COLUMNS) {
      if (key.startsWith("spark:")) {
        const metric = key.slice(6);
        const td = add(key, "c-spark");
        td.dataset.metric = metric;
        const canvas = el("canvas", "spark");
        canvas.dataset.metric = metric;
        td.appendChild(canvas);
        td.appendChild(el("span", "arrow"));
      } else {
        add(key).dataset.metric = key;
      }
    }
    add("update"); add("age"); add("dropped", "dropped"); add("status", "c-status");
    tr.addEventListener("click", (ev) => {
      const td = ev.target.closest("td");
      const metric = td && td.dataset.metric ? td.dataset.metric : "grad_norm";
      openChart(data.id, metric);
    });
    return { data, tr, cells };
  }

  function renderRow(entry) {
    const d = entry.data, c = entry.cells;
    entry.tr.className = "worker st-" + d.status + (chart && chart.id === d.id ? " selected" : "");
    c.restart.textContent = d.restarts ? " ↻" + (d.restarts > 1 ? d.restarts : "") : "";
    for (const [key, digits] of COLUMNS) {
      if (key.startsWith("spark:")) {
        const metric = key.slice(6);
        const [levels, arrow] = d.spark[metric];
        const health = d.m[metric][1];
        drawSpark(c[key].firstChild, levels, health);
        const a = c[key].lastChild;
        a.textContent = arrow || "";
        a.className = "arrow h-" + (health || "none");
      } else {
        const [v, health] = d.m[key];
        c[key].textContent = fmt(v, digits, key === "grad_norm" || key === "pre_clip_grad_norm");
        c[key].className = health ? "h-" + health : "";
      }
    }
    c.update.textContent = d.update === null || d.update === undefined ? "–" : String(d.update);
    c.dropped.textContent = d.dropped ? String(d.dropped) : "";
    c.status.textContent = d.label;
    c.status.className = "c-status " + STATUS_CLASS(d.status);
    renderAge(entry);
  }

  function renderAge(entry) {
    entry.cells.age.textContent = fmtAge(serverNow() - entry.data.seen);
    entry.cells.age.className = entry.data.status === "stale" ? "s-stale" : "";
  }

  function upsertRow(data) {
    let entry = rows.get(data.id);
    if (!entry) {
      entry = makeRow(data);
      rows.set(data.id, entry);
    } else {
      entry.data = data;
    }
    runEntry(data.run);
    // A row outside the table (the fleet view shows only the worst) is drawn when it
    // enters it: at 256 workers that saves the browser ~15 of every 16 row redraws.
    if (entry.tr.isConnected) { renderRow(entry); entry.stale = false; } else entry.stale = true;
    if (chart && chart.id === data.id && data.pts) addChartPoints(data.pts);
    return entry.tr.isConnected;
  }

  function removeRow(id) {
    const entry = rows.get(id);
    if (!entry) return;
    entry.tr.remove();
    rows.delete(id);
  }

  // Which rows of a run are in the table: all of them, or for a run with more workers than
  // fit, the worst N the server names (the fleet view), in worker order.
  function layoutRun(entry) {
    const members = [...rows.values()].filter((r) => r.data.run === entry.run);
    members.sort((a, b) => workerOrder(a.data.worker, b.data.worker));
    let shown = members;
    const fleetView = members.length > config.max_rows;
    if (fleetView) {
      const worst = new Set((entry.fleet && entry.fleet.worst) || []);
      shown = members.filter((r) => worst.has(r.data.id)).slice(0, config.worst_n);
    }
    const want = [entry.fleetTr];
    if (fleetView) want.push(entry.distTr);
    for (const r of shown) want.push(r.tr);
    if (fleetView) {
      entry.moreTd.textContent = "… " + (members.length - shown.length) +
        " more worker(s) not shown (the healthiest); use --run or --max-rows";
      want.push(entry.moreTr);
    }
    const current = [...entry.tbody.children];
    if (current.length === want.length && current.every((n, i) => n === want[i])) return;
    entry.tbody.replaceChildren(...want);
    for (const r of shown) if (r.stale) { renderRow(r); r.stale = false; }
  }

  function workerOrder(a, b) {
    const na = typeof a === "number", nb = typeof b === "number";
    if (na && nb) return a - b;
    if (na) return -1;
    if (nb) return 1;
    return String(a) < String(b) ? -1 : String(a) > String(b) ? 1 : 0;
  }

  function renderFleet(f) {
    const entry = runEntry(f.run);
    entry.fleet = f;
    const c = entry.fleetCells;
    const metrics = (f.summary && f.summary.metrics) || {};
    const mean = (metric, digits) => {
      const td = c[metric];
      const m = metrics[metric];
      if (!m) { td.textContent = "–"; td.className = "h-unknown"; return; }
      if (m.nonfinite) { td.textContent = "NaN×" + m.nonfinite; td.className = "h-nonfinite"; return; }
      td.textContent = fmt(m.mean, digits, false);
      const h = f.health[metric];
      td.className = h && h !== "unknown" ? "h-" + h : "";
    };
    mean("grad_norm", 3); mean("pre_clip_grad_norm", 3); mean("approx_kl", 4);
    mean("clip_fraction", 3); mean("entropy", 3); mean("explained_variance", 2);
    mean("episode_return_mean", 1);
    const g = metrics.grad_norm;
    c.spark.textContent = g && g.worst_worker !== null && g.worst_worker !== undefined
      ? "worst w" + g.worst_worker + " " + fmt(g.worst_value, 2) : "";
    c.update.textContent = String((f.summary && f.summary.updates) || 0);
    c.age.textContent = f.source === "aggregator" ? "agg" : f.source === "final" ? "final" : "";
    const live = (f.summary && f.summary.workers_live) || 0;
    const total = live + ((f.summary && f.summary.workers_stale) || 0);
    c.status.textContent = total ? live + "/" + total + " live" : (f.done ? "done" : "0 live");
    c.status.className = "c-status " + (total && live !== total ? "s-stale" : "");
    if (f.dist) {
      const parts = [];
      for (const [metric, d] of Object.entries(f.dist)) {
        const h = d.health || {};
        parts.push(metric + " p50 " + fmt(d.p50, 3) + " p90 " + fmt(d.p90, 3) + " max " + fmt(d.max, 3) +
          (d.nonfinite ? " NaN×" + d.nonfinite : "") +
          ((h.critical || h.warning) ? " (" + (h.critical || 0) + " crit, " + (h.warning || 0) + " warn)" : ""));
      }
      entry.distTd.textContent = f.workers + " workers · " + parts.join(" · ");
    }
    layoutRun(entry);
  }

  // ------------------------------------------------------------------ banner, alerts, footer

  function renderBanner(b) {
    const banner = $("banner");
    banner.textContent = b.state;
    banner.className = BANNER_CLASS(b.state);
    const counts = b.counts || {};
    const bits = [(counts.live || 0) + " live"];
    for (const k of ["stale", "NaN", "critical", "warning", "done"]) if (counts[k]) bits.push(counts[k] + " " + k);
    if (counts.alerts) bits.push(counts.alerts + " alert" + (counts.alerts > 1 ? "s" : "") + " firing");
    $("counts").textContent = bits.join(" · ");
    $("detail").textContent = b.detail || "";
  }

  function renderAlerts(list) {
    alerts = list;
    const section = $("alerts");
    const ul = $("alert-list");
    section.hidden = list.length === 0;
    section.className = "alerts" + (list.some((a) => a.severity === "critical") ? " critical" : "");
    $("alerts-title").textContent = "firing alerts (" + list.length + ")";
    const items = list.map((a) => {
      const li = el("li", "alert");
      li.dataset.key = a.run + "/" + a.worker + "/" + a.rule;
      li.appendChild(el("span", "sev-" + a.severity, a.severity.toUpperCase().padEnd(9)));
      li.appendChild(el("span", "", " " + a.run + "/" + a.worker + " "));
      li.appendChild(el("b", "", a.rule));
      li.appendChild(el("span", "", " " + a.metric + "=" + fmt(a.value, 3)));
      if (a.threshold !== null && a.threshold !== undefined) li.appendChild(el("span", "note", " (limit " + fmt(a.threshold, 3) + ")"));
      const age = el("span", "note alert-age");
      age.dataset.since = String(a.since);
      li.appendChild(age);
      if (a.summary) li.appendChild(el("span", "note summary", " — " + a.summary));
      return li;
    });
    ul.replaceChildren(...items);
    renderAlertAges();
  }

  function renderAlertAges() {
    for (const span of document.querySelectorAll(".alert-age")) {
      span.textContent = " for " + fmtAge(serverNow() - Number(span.dataset.since));
    }
  }

  function renderFooter(f) {
    stats.footer = f;
    const bits = [f.events.toLocaleString() + " events", Math.round(f.rate) + "/s",
      "lost " + f.lost, "rejected " + f.rejected];
    if (!alerts.length) bits.push(f.alert_events ? "alerts: none firing" : "alerts: no alerting process seen");
    if (f.forwarded !== null && f.forwarded !== undefined) bits.push("daemon fwd " + f.forwarded.toLocaleString());
    if (f.endpoint) bits.push(f.endpoint);
    bits.push(f.clients + " page(s) open");
    $("footer").textContent = bits.join(" · ");
  }

  // ------------------------------------------------------------------ the longer chart

  function openChart(id, metric) {
    if (chart && chart.id === id && chart.metric === metric) return;
    const entry = rows.get(id);
    if (!entry) return;
    chart = { id, metric, points: [], seen: new Set() };
    for (const r of rows.values()) r.tr.classList.toggle("selected", r.data.id === id);
    $("chart-panel").hidden = false;
    $("chart-title").textContent = id;
    renderMetricPicks();
    const q = new URLSearchParams({ run: entry.data.run, worker: String(entry.data.worker) });
    fetch("api/history?" + q.toString(), { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => {
        if (!body || !chart || chart.id !== id) return;
        chart.metrics = body.metrics;
        addChartPoints(body.points);
      })
      .catch(() => {});
  }

  function renderMetricPicks() {
    const box = $("chart-metrics");
    const names = ["grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction", "entropy",
      "explained_variance", "episode_return_mean"];
    box.replaceChildren(...names.map((m) => {
      const s = el("span", "metric-pick" + (chart.metric === m ? " on" : ""), m + " ");
      s.addEventListener("click", () => { chart.metric = m; renderMetricPicks(); drawChart(); });
      return s;
    }));
  }

  function addChartPoints(points) {
    for (const p of points) {
      if (chart.seen.has(p[0])) continue;
      chart.seen.add(p[0]);
      chart.points.push(p.map(val));
    }
    chart.points.sort((a, b) => a[0] - b[0]);
    while (chart.points.length > config.history) chart.seen.delete(chart.points.shift()[0]);
    drawChart();
  }

  // Every point drawn: with more points than pixels, each pixel column shows the min..max
  // of its points, so a spike is never averaged away. Non-finite points: red marks on top.
  function drawChart() {
    if (!chart) return;
    const canvas = $("chart");
    const dpr = window.devicePixelRatio || 1;
    const W = canvas.clientWidth || 1200, H = canvas.clientHeight || 260;
    if (canvas.width !== Math.round(W * dpr)) { canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr); }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const names = ["grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction", "entropy",
      "explained_variance", "episode_return_mean"];
    const col = 2 + names.indexOf(chart.metric);
    const pts = chart.points.filter((p) => p[col] !== null && p[col] !== undefined);
    const finite = pts.filter((p) => Number.isFinite(p[col])).map((p) => p[col]);
    const left = 60, right = 10, top = 12, bottom = 22;
    ctx.font = "11px ui-monospace, monospace";
    ctx.fillStyle = "#6b7785";
    if (!pts.length) { ctx.fillText("no values yet", left, H / 2); $("chart-note").textContent = ""; return; }
    let lo = Math.min(...finite), hi = Math.max(...finite);
    if (!finite.length) { lo = 0; hi = 1; }
    if (hi - lo < 1e-12) { lo -= 0.5 * Math.abs(lo || 1); hi += 0.5 * Math.abs(hi || 1); }
    const n = pts.length;
    const x = (i) => left + (n === 1 ? 0 : (i / (n - 1)) * (W - left - right));
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (H - top - bottom);
    ctx.strokeStyle = "#27313d";
    ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, H - bottom); ctx.lineTo(W - right, H - bottom); ctx.stroke();
    ctx.fillText(fmt(hi, 3), 2, top + 8);
    ctx.fillText(fmt(lo, 3), 2, H - bottom);
    ctx.fillText("update " + pts[0][1], left, H - 6);
    ctx.fillText("update " + pts[n - 1][1], W - right - 90, H - 6);
    ctx.strokeStyle = "#58a6ff";
    ctx.lineWidth = 1.25;
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < n; i++) {
      const v = pts[i][col];
      if (!Number.isFinite(v)) { pen = false; continue; }
      if (pen) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
      pen = true;
    }
    ctx.stroke();
    let bad = 0;
    ctx.strokeStyle = COLORS.critical;
    ctx.lineWidth = 2;
    for (let i = 0; i < n; i++) {
      if (Number.isFinite(pts[i][col])) continue;
      bad++;
      ctx.beginPath(); ctx.moveTo(x(i) - 4, top); ctx.lineTo(x(i) + 4, top + 8);
      ctx.moveTo(x(i) + 4, top); ctx.lineTo(x(i) - 4, top + 8); ctx.stroke();
    }
    $("chart-note").textContent = chart.metric + ": " + n + " updates seen" + (bad ? ", " + bad + " non-finite (red ×)" : "") +
      " · last " + fmt(pts[n - 1][col], 4);
  }

  $("chart-close").addEventListener("click", () => {
    chart = null;
    $("chart-panel").hidden = true;
    for (const r of rows.values()) r.tr.classList.remove("selected");
  });
  for (const th of document.querySelectorAll("th[data-metric]")) {
    th.addEventListener("click", () => {
      const target = chart ? chart.id : [...rows.keys()][0];
      if (target) { if (chart) { chart.metric = th.dataset.metric; renderMetricPicks(); drawChart(); } else openChart(target, th.dataset.metric); }
    });
  }

  // ------------------------------------------------------------------ messages

  function apply(body, isInit) {
    clockOffset = body.now - Date.now() / 1000;
    if (isInit) {
      config = Object.assign(config, body.config || {});
      for (const id of [...rows.keys()]) removeRow(id);
      for (const r of runs.values()) r.tbody.remove();
      runs.clear();
      $("empty").hidden = false;
    }
    const touchedRuns = new Set();
    const drawn = [];
    if (body.rows) {
      for (const r of body.rows) { if (upsertRow(r)) drawn.push(r); touchedRuns.add(r.run); }
      stats.rowsUpdated += body.rows.length;
    }
    if (body.gone) for (const id of body.gone) { const e = rows.get(id); if (e) touchedRuns.add(e.data.run); removeRow(id); }
    if (body.fleet) for (const f of body.fleet) { renderFleet(f); touchedRuns.delete(f.run); }
    for (const run of touchedRuns) { const e = runs.get(run); if (e) layoutRun(e); }
    if (body.alerts) renderAlerts(body.alerts);
    if (body.banner) renderBanner(body.banner);
    if (body.footer) renderFooter(body.footer);
    if (BENCH && drawn.length) {
      // Rows drawn on screen by this message (rows the fleet view leaves out are not).
      const stamps = drawn.map((r) => r.ts).filter((t) => typeof t === "number");
      // Where the time went: up to the server's push (bus + web process), and after it.
      for (const t of stamps) stats.serverLatencies.push(body.now - t);
      requestAnimationFrame(() => {
        const now = Date.now() / 1000;
        for (const t of stamps) stats.latencies.push(now - t);
        if (stats.latencies.length > 200000) stats.latencies.splice(0, 100000);
        if (stats.serverLatencies.length > 200000) stats.serverLatencies.splice(0, 100000);
      });
    }
  }

  let source = null;
  function connect() {
    source = new EventSource("events");
    source.addEventListener("init", (ev) => {
      stats.inits++; stats.messages++;
      setConn("● connected", false);
      apply(JSON.parse(ev.data), true);
    });
    source.addEventListener("delta", (ev) => {
      stats.messages++;
      apply(JSON.parse(ev.data), false);
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused (403 after a restart with a new token) or is gone: retry.
        setConn("disconnected from trainbus web; retrying…", true);
        source.close();
        setTimeout(connect, 2000);
      } else {
        setConn("reconnecting…", true);
      }
    };
  }
  function setConn(text, bad) {
    const c = $("conn");
    c.textContent = text;
    c.className = "conn" + (bad ? " bad" : "");
    stats.connected = !bad;
  }

  setInterval(() => {
    for (const entry of rows.values()) if (entry.tr.isConnected) renderAge(entry);
    renderAlertAges();
    $("clock").textContent = "trainbus web " + new Date(serverNow() * 1000).toLocaleTimeString();
  }, 250);
  window.addEventListener("resize", drawChart);
  connect();
})();
