//! The control plane's Prometheus metrics (OpenMetrics text through `prometheus-client`).
//!
//! Counters move where things happen (a start, a stop, an agent's report, a migration's end, a
//! volume round, an API request); gauges that describe the fleet (machines by state, migrations
//! by phase, bridge hits per mapping) are read from the store and the agents when scraped, so
//! every server of a fleet reports the same truth and nothing drifts.

use crate::error::{Error, Result};
use crate::Core;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `start`, `stop`, `exit`, `restart`.
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `done`, `rolled_back`, `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MappingLabels {
    pub network: String,
    pub old: String,
    pub new: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    /// The route's template (`/v1/apps/{app}/machines/{id}`), never the path itself, so the
    /// label set stays bounded.
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RcodeLabels {
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, ...
    pub rcode: String,
}

/// What runs at each scrape before encoding (parts of the process the core does not own, e.g.
/// the DNS server, bring their counters up to date).
pub type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Every metric of one server process.
pub struct Metrics {
    registry: Registry,
    /// `.internal` DNS responses by RCODE (kept up to date by a scrape hook of whoever serves
    /// DNS in this process).
    pub dns_responses: Family<RcodeLabels, Counter>,
    hooks: std::sync::Mutex<Vec<ScrapeHook>>,
    pub machine_events: Family<EventLabels, Counter>,
    pub migrations_finished: Family<OutcomeLabels, Counter>,
    /// Seconds from the source's stop to the destination's start, per finished migration.
    pub migration_downtime: Histogram,
    /// Where machine starts spend their time, by phase (see [`Metrics::start_phase`]).
    pub start_phases: Family<PhaseLabels, Histogram>,
    pub volume_bytes_copied: Counter,
    pub api_requests: Family<RouteLabels, Histogram>,
    machines: Family<StateLabels, Gauge>,
    migrations: Family<PhaseLabels, Gauge>,
    bridge_hits: Family<MappingLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let machine_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "machine_events",
            "Machine starts and stops (by the control plane), exits and restarts (reported by agents)",
            machine_events.clone(),
        );
        let migrations_finished = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "migrations_finished",
            "Migrations that ended, by outcome",
            migrations_finished.clone(),
        );
        // 10 ms .. ~82 s.
        let migration_downtime = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 14),
        );
        registry.register(
            "migration_downtime_seconds",
            "From the source's stop to the destination's start, per finished migration",
            migration_downtime.clone(),
        );
        let start_phases = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            // 0.1 ms .. ~3 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            ))
        });
        registry.register(
            "machine_start_phase_seconds",
            "Where machine starts spend their time: the control plane's phases (create: the \
             store's create; starting: the store's transition; agent: the whole agent call; \
             started: the store's transition) and the agent's (netns, cgroup, bridge, files, \
             spawn, init; release instead of spawn for a machine staged ahead, a migration's)",
            start_phases.clone(),
        );
        let volume_bytes_copied = Counter::default();
        registry.register(
            "volume_copied_bytes",
            "Volume bytes sent by migrations' copy rounds",
            volume_bytes_copied.clone(),
        );
        let api_requests = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 1 ms .. ~33 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 16,
            ))
        });
        registry.register(
            "api_request_duration_seconds",
            "API requests by method, route template and status",
            api_requests.clone(),
        );
        let machines = Family::<StateLabels, Gauge>::default();
        registry.register("machines", "Machines by state", machines.clone());
        let migrations = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "migrations",
            "Migrations by phase (finished ones included)",
            migrations.clone(),
        );
        let bridge_hits = Family::<MappingLabels, Gauge>::default();
        registry.register(
            "bridge_hits",
            "Uses of each bridge mapping so far (all callers), as the hosts count them",
            bridge_hits.clone(),
        );
        let dns_responses = Family::<RcodeLabels, Counter>::default();
        registry.register(
            "dns_responses",
            "Responses of this process's .internal DNS, by RCODE",
            dns_responses.clone(),
        );
        Metrics {
            registry,
            dns_responses,
            hooks: Default::default(),
            machine_events,
            migrations_finished,
            migration_downtime,
            start_phases,
            volume_bytes_copied,
            api_requests,
            machines,
            migrations,
            bridge_hits,
        }
    }
}

impl Metrics {
    /// Records `took` under a start phase.
    pub fn start_phase(&self, phase: &str, took: std::time::Duration) {
        self.start_phases
            .get_or_create(&PhaseLabels {
                phase: phase.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Runs `hook` at every scrape, before the text is encoded.
    pub fn on_scrape(&self, hook: ScrapeHook) {
        self.hooks.lock().unwrap().push(hook);
    }

    pub fn machine_event(&self, event: &str) {
        self.machine_events
            .get_or_create(&EventLabels {
                event: event.to_owned(),
            })
            .inc();
    }
}

/// The metrics as OpenMetrics text, the fleet's gauges read now.
pub async fn scrape(core: &Core) -> Result<String> {
    let m = &core.metrics;
    let mut by_state = std::collections::BTreeMap::<String, i64>::new();
    for s in ferry_store::MachineState::ALL {
        by_state.insert(s.as_str().to_owned(), 0);
    }
    for machine in core.store.list_machines_all(None)? {
        *by_state
            .entry(machine.state.as_str().to_owned())
            .or_default() += 1;
    }
    for (state, n) in by_state {
        m.machines.get_or_create(&StateLabels { state }).set(n);
    }
    let mut by_phase = std::collections::BTreeMap::<String, i64>::new();
    for mig in crate::migrate::list(core, &crate::auth::Caller::server(), None, None)? {
        *by_phase.entry(mig.phase.as_str().to_owned()).or_default() += 1;
    }
    m.migrations.clear();
    for (phase, n) in by_phase {
        m.migrations.get_or_create(&PhaseLabels { phase }).set(n);
    }
    let mut hits = std::collections::BTreeMap::<(u32, String), u64>::new();
    for h in crate::bridge::all_hits(core).await? {
        *hits.entry((h.network_id, h.old)).or_default() += h.count;
    }
    m.bridge_hits.clear();
    for b in crate::bridge::mappings(core)? {
        let n = hits
            .get(&(b.network_id, b.old.clone()))
            .copied()
            .unwrap_or(0);
        m.bridge_hits
            .get_or_create(&MappingLabels {
                network: b.network_id.to_string(),
                old: b.old,
                new: b.new,
            })
            .set(n as i64);
    }
    for hook in m.hooks.lock().unwrap().iter() {
        hook(m);
    }
    let mut out = String::new();
    encode(&mut out, &m.registry).map_err(|e| Error::internal(format!("encoding metrics: {e}")))?;
    Ok(out)
}
