// The transparency page: reads /open-data/dashboard.json and fills the tables and the chart.
// No library, no CDN; text is set with textContent only.
"use strict";

function cell(v, fmt) {
  const td = document.createElement("td");
  if (v === null || v === undefined) {
    td.textContent = "·";
    td.className = "suppressed";
    td.title = "fewer than 5";
  } else {
    td.textContent = fmt ? fmt(v) : String(v);
  }
  return td;
}

function text(v) {
  const td = document.createElement("td");
  td.textContent = v;
  td.className = "text";
  return td;
}

const pct = (v) => (v * 100).toFixed(1) + "%";
const secs = (v) => Math.round(v) + " s";
const days = (v) => v.toFixed(1);

function fill(id, rows, make) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const td of make(r)) tr.appendChild(td);
    body.appendChild(tr);
  }
}

function service(r) {
  return text(r.service_name || r.service_code);
}

async function load() {
  const res = await fetch("/open-data/dashboard.json");
  if (!res.ok) {
    document.getElementById("generated").textContent = "The figures are unavailable right now.";
    return;
  }
  const d = await res.json();
  document.getElementById("generated").textContent = "As of " + d.generated + ".";
  const daysNewest = d.call_centre_daily.slice().reverse();
  fill("calls", daysNewest, (r) => [
    text(r.date), cell(r.calls), cell(r.offered), cell(r.answered), cell(r.abandoned),
    cell(r.service_level, pct), cell(r.asa_seconds, secs), cell(r.abandonment_rate, pct),
  ]);
  const chart = document.getElementById("sl-chart");
  chart.replaceChildren();
  for (const r of d.call_centre_daily) {
    const bar = document.createElement("div");
    if (r.service_level === null) {
      bar.className = "none";
      bar.title = r.date + ": not shown";
    } else {
      bar.style.height = Math.max(1, r.service_level * 100) + "%";
      bar.title = r.date + ": " + pct(r.service_level);
    }
    chart.appendChild(bar);
  }
  fill("weekly", d.requests_weekly.slice().reverse(), (r) => [
    text(r.week_start), service(r), cell(r.opened), cell(r.closed),
  ]);
  fill("close", d.time_to_close, (r) => [service(r), cell(r.closed), cell(r.median_days, days)]);
  fill("age", d.open_by_age, (r) => [
    service(r), cell(r.days_0_7), cell(r.days_8_30), cell(r.days_31_90), cell(r.days_over_90),
  ]);
}

load();
