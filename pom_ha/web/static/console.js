// POM Monitor console: live updates over Server-Sent Events, confirmations, charts (uPlot, vendored).
(function () {
  "use strict";
  function live() {
    var slots = document.querySelectorAll("[data-live], [data-job-state]");
    if (!slots.length || !window.EventSource) return;
    var es = new EventSource("/events");
    ["components", "timeline", "servers"].forEach(function (kind) {
      es.addEventListener(kind, function (e) {
        document.querySelectorAll('[data-live="' + kind + '"]').forEach(function (el) { el.innerHTML = e.data; });
        document.body.setAttribute("data-updated-" + kind, String(Date.now()));
      });
    });
    es.addEventListener("jobs", function (e) {
      var states = JSON.parse(e.data);
      Object.keys(states).forEach(function (id) {
        var el = document.querySelector('[data-job-state="' + id + '"]');
        if (el && el.textContent !== states[id]) el.textContent = states[id];
      });
    });
    es.addEventListener("dbdown", function (e) {
      var el = document.getElementById("dbdown");
      if (!el) return;
      el.textContent = e.data;
      el.hidden = !e.data;
    });
  }
  function confirms() {
    document.querySelectorAll('[data-action="apply"]').forEach(function (btn) {
      btn.addEventListener("click", function (ev) {
        var form = btn.closest("form");
        var box = form && form.querySelector("[data-confirm]");
        if (box && !box.checked) {
          ev.preventDefault(); ev.stopImmediatePropagation();
          var slot = form.parentElement.querySelector(".result-slot");
          if (slot) slot.textContent = "Tick the confirmation first: " + btn.getAttribute("data-warning");
          return;
        }
        if (!window.confirm(btn.getAttribute("data-warning"))) { ev.preventDefault(); ev.stopImmediatePropagation(); }
      }, true);
    });
  }
  function charts() {
    if (!window.uPlot) return;
    var trend = document.getElementById("trend-chart");
    if (trend) {
      var rows = JSON.parse(trend.getAttribute("data-trend") || "[]");
      if (rows.length) {
        var data = [0, 1, 2, 3].map(function (i) { return rows.map(function (r) { return r[i]; }); });
        new window.uPlot({ width: Math.min(900, trend.clientWidth || 900), height: 220,
          series: [{}, { label: "attempts/min", stroke: "#1e88e5" }, { label: "answered", stroke: "#43a047" },
                   { label: "nuisance", stroke: "#e53935" }] }, data, trend);
      }
    }
    var tl = document.getElementById("timeline-chart");
    if (tl) {
      var pts = JSON.parse(tl.getAttribute("data-points") || "[]");
      if (pts.length) {
        var roles = []; pts.forEach(function (p) { var k = p.service + "/" + p.scope; if (roles.indexOf(k) < 0) roles.push(k); });
        var xs = pts.map(function (p) { return p.t; });
        var ys = pts.map(function (p) { return roles.indexOf(p.service + "/" + p.scope); });
        new window.uPlot({ width: Math.min(900, tl.clientWidth || 900), height: 60 + roles.length * 24,
          series: [{}, { label: "lease changes (row = role/scope)", stroke: "transparent",
                         points: { show: true, size: 8, fill: "#e53935" } }],
          axes: [{}, { values: function (u, v) { return v.map(function (i) { return roles[i] || ""; }); }, size: 180 }] },
          [xs, ys], tl);
      }
    }
  }
  document.addEventListener("DOMContentLoaded", function () { live(); confirms(); charts(); });
})();
