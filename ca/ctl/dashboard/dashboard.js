// The mesh dashboard: reads /api/graph and /api/history every few seconds and draws the service
// graph (Cytoscape.js), a table of every edge, and each service's golden signals (uPlot).
'use strict';

const REFRESH_MS = 2000;
const COLORS = {
  workload: '#2f80ed', service: '#9b51e0', waypoint: '#f2994a', gateway: '#27ae60', unknown: '#9aa5b1',
};
const SHAPES = {
  workload: 'ellipse', service: 'triangle', waypoint: 'hexagon', gateway: 'diamond', unknown: 'ellipse',
};

let cy = null;
let drawn = '';            // the ids of the drawn elements, to know when to lay out again
const charts = new Map();  // service hostname -> {rate, latency, now}

// Numbers as people read them.
function num(x, digits = 1) {
  if (x === null || x === undefined) return '–';
  if (x >= 100) return x.toFixed(0);
  return x.toFixed(digits);
}
function pct(x) { return x === null || x === undefined ? '–' : `${(x * 100).toFixed(x > 0 && x < 0.01 ? 2 : 1)} %`; }
function ms(x) { return x === null || x === undefined ? '–' : `${num(x)} ms`; }
function bytes(x) {
  if (!x) return '–';
  const units = ['B/s', 'KB/s', 'MB/s', 'GB/s'];
  let i = 0;
  while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
  return `${num(x)} ${units[i]}`;
}
function security(mtls) { return mtls === true ? '🔒 mTLS' : mtls === false ? 'plaintext' : '–'; }

function nodeLabel(n) {
  if (n.kind === 'unknown') return 'outside / unknown';
  return n.namespace ? `${n.name}\n${n.namespace}` : n.name;
}

function edgeLabel(e) {
  const lock = e.mtls === true ? '🔒 ' : e.mtls === false ? 'plaintext · ' : '';
  if (e.protocol === 'http') {
    return `${lock}${num(e.rps)} rps · ${pct(e.error_rate)} err · p50 ${ms(e.p50_ms)} · p99 ${ms(e.p99_ms)}`;
  }
  return `${lock}${num(e.cps)} conn/s · ${bytes(e.bytes_per_s)}`;
}

function edgeColor(e) {
  if (e.mtls === false) return '#c81e1e';
  if (e.error_rate !== null && e.error_rate > 0.1) return '#c81e1e';
  if (e.error_rate !== null && e.error_rate > 0.01) return '#d97706';
  return e.protocol === 'http' ? '#3b8250' : '#52606d';
}

function elements(graph) {
  const nodes = graph.nodes.map((n) => ({
    group: 'nodes',
    data: { id: n.id, label: nodeLabel(n), kind: n.kind, color: COLORS[n.kind], shape: SHAPES[n.kind] },
  }));
  const edges = graph.edges.map((e) => ({
    group: 'edges',
    data: {
      id: e.id, source: e.source, target: e.target, label: edgeLabel(e), color: edgeColor(e),
      width: 1.5 + Math.min(6, Math.log10(1 + (e.protocol === 'http' ? e.rps : e.cps)) * 3),
      style: e.protocol === 'http' ? 'solid' : 'dashed',
    },
  }));
  return nodes.concat(edges);
}

function drawGraph(graph) {
  if (!cy) {
    cy = cytoscape({
      container: document.getElementById('graph'),
      wheelSensitivity: 0.3,
      style: [
        { selector: 'node', style: {
          'background-color': 'data(color)', shape: 'data(shape)', label: 'data(label)',
          'text-wrap': 'wrap', 'text-valign': 'bottom', 'text-margin-y': 6, 'font-size': 11,
          color: '#1f2933', width: 34, height: 34,
        } },
        { selector: 'node[kind = "waypoint"], node[kind = "gateway"]', style: { width: 40, height: 40 } },
        { selector: 'edge', style: {
          'curve-style': 'bezier', 'target-arrow-shape': 'triangle', 'line-color': 'data(color)',
          'target-arrow-color': 'data(color)', width: 'data(width)', 'line-style': 'data(style)',
          label: 'data(label)', 'font-size': 9, 'text-rotation': 'autorotate', 'text-margin-y': -8,
          'text-background-color': '#ffffff', 'text-background-opacity': 0.85, 'text-background-padding': 2,
          color: '#323f4b',
        } },
      ],
    });
  }
  const els = elements(graph);
  const ids = els.map((e) => e.data.id).sort().join('\n');
  if (ids !== drawn) {
    cy.elements().remove();
    cy.add(els);
    const roots = cy.nodes().filter((n) => n.indegree(false) === 0);
    cy.layout({
      name: 'breadthfirst', directed: true, roots, spacingFactor: 1.1, padding: 40, animate: false,
      // Left to right: traffic flows across the page.
      transform: (node, pos) => ({ x: pos.y * 1.6, y: pos.x * 0.6 }),
    }).run();
    cy.fit(undefined, 40);
    drawn = ids;
  } else {
    for (const el of els) cy.getElementById(el.data.id).data(el.data);
  }
  document.body.dataset.nodes = String(cy.nodes().length);
  document.body.dataset.edges = String(cy.edges().length);
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function drawTable(graph) {
  // Services by hostname, workloads as name.namespace: a service and its pods often share a name.
  const names = new Map(graph.nodes.map((n) => [n.id, n.kind === 'unknown' ? 'outside / unknown'
    : n.kind === 'service' ? n.id.replace(/^service:/, '')
      : n.namespace ? `${n.name}.${n.namespace}` : n.name]));
  const body = document.querySelector('#edges tbody');
  const rows = graph.edges.map((e) => {
    const tr = document.createElement('tr');
    tr.dataset.edge = e.id;
    tr.append(
      cell(names.get(e.source) || e.source), cell(names.get(e.target) || e.target), cell(e.protocol),
      cell(e.protocol === 'http' ? num(e.rps) : '–', 'num'),
      cell(pct(e.error_rate), 'num' + (e.error_rate > 0.01 ? ' warn' : '')),
      cell(ms(e.p50_ms), 'num'), cell(ms(e.p99_ms), 'num'), cell(e.cps ? num(e.cps) : '–', 'num'),
      cell(bytes(e.bytes_per_s), 'num'), cell(security(e.mtls), e.mtls === false ? 'bad' : ''),
    );
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell('no traffic in the window yet');
    td.colSpan = 10;
    tr.append(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function chart(title, series, target) {
  const opts = {
    title, width: 480, height: 170, cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true } }, legend: { live: false },
    series: [{}].concat(series),
    axes: [{}, { size: 50 }],
  };
  return new uPlot(opts, [[]].concat(series.map(() => [])), target);
}

function drawServices(history, graph) {
  const box = document.getElementById('services');
  for (const [name, columns] of Object.entries(history.services)) {
    let c = charts.get(name);
    if (!c) {
      const card = document.createElement('div');
      card.className = 'service';
      card.dataset.service = name;
      const h = document.createElement('h3');
      h.textContent = name;
      const now = document.createElement('p');
      now.className = 'now';
      card.append(h, now);
      box.append(card);
      c = {
        now,
        rate: chart('Requests/s and errors %', [
          { label: 'requests/s', stroke: '#2f80ed', width: 2 },
          { label: 'errors %', stroke: '#c81e1e', width: 1.5 },
        ], card),
        latency: chart('Latency (ms)', [
          { label: 'p50', stroke: '#27ae60', width: 2 },
          { label: 'p99', stroke: '#f2994a', width: 2 },
        ], card),
      };
      charts.set(name, c);
    }
    const errors = columns.error_rate.map((x) => (x === null ? null : x * 100));
    c.rate.setData([history.t, columns.rps, errors]);
    c.latency.setData([history.t, columns.p50_ms, columns.p99_ms]);
    const s = graph.services[name];
    c.now.textContent = s
      ? `now: ${num(s.rps)} requests/s · ${pct(s.error_rate)} errors · p50 ${ms(s.p50_ms)} · p99 ${ms(s.p99_ms)}`
      : 'now: no requests in the window';
  }
}

function drawStatus(graph) {
  const status = document.getElementById('status');
  document.getElementById('window').textContent = graph.window_s ? `(rates over the last ${graph.window_s} s)` : '';
  if (!graph.updated_ms) {
    status.textContent = graph.source ? `reading ${graph.source}…` : 'waiting for the first figures…';
  } else {
    const age = Math.max(0, Math.round((Date.now() - graph.updated_ms) / 1000));
    status.textContent = `figures from ${graph.source}, ${age} s ago · ${graph.nodes.length} nodes, ${graph.edges.length} edges`;
  }
  const problems = document.getElementById('problems');
  problems.replaceChildren(...graph.problems.map((p) => {
    const li = document.createElement('li');
    li.textContent = p;
    return li;
  }));
  problems.hidden = graph.problems.length === 0;
}

async function refresh() {
  try {
    const [graph, history] = await Promise.all(
      ['api/graph', 'api/history'].map((u) => fetch(u, { cache: 'no-store' }).then((r) => {
        if (!r.ok) throw new Error(`${u}: ${r.status}`);
        return r.json();
      })),
    );
    drawStatus(graph);
    if (graph.updated_ms) {
      drawGraph(graph);
      drawTable(graph);
      drawServices(history, graph);
      document.body.dataset.state = 'live';
      document.body.dataset.updated = String(graph.updated_ms);
    }
  } catch (err) {
    document.getElementById('status').textContent = `cannot reach the dashboard's server: ${err.message}`;
    document.body.dataset.state = 'unreachable';
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
