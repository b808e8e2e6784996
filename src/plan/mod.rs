//! Spec → DAG of pure, content-addressed jobs.
//!
//! A job's id hashes its kind, the kind's implementation version, the parameters that determine
//! its result (file *contents* by hash, not paths) and the ids of its inputs. Two grid cells that
//! need the same upstream work therefore share one job, and editing a spec re-uses every job
//! whose inputs did not change.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Cell, Spec, SpecError};
use crate::util::{canonical_json, sha256_bytes};

/// A job's content hash (16 hex digits).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub fn new(id: impl Into<String>) -> Self {
        JobId(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One unit of work: what to run (`kind` + `params`) and what it needs first (`deps`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Job {
    pub id: JobId,
    pub kind: String,
    /// A short human-readable name, e.g. `smooth resnet20 σ=0.25`.
    pub label: String,
    /// Everything the runner needs, including paths.
    pub params: serde_json::Value,
    pub deps: Vec<JobId>,
    /// What the job's progress counts; not part of its identity (nor of `caf plan --json`).
    #[serde(skip)]
    pub unit: ProgressUnit,
}

impl Job {
    /// The same job, its progress counted in `unit`.
    pub fn counted_in(mut self, unit: ProgressUnit) -> Job {
        self.unit = unit;
        self
    }
}

/// What a job's progress counts. The planner says it, so the store, `caf status` and reports
/// can tell a training job's epochs from a certification's images without knowing job kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressUnit {
    #[default]
    Images,
    Epochs,
    /// Forward passes: a sequential certification's images cost from n0 to n0 + n_max.
    Draws,
}

impl ProgressUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            ProgressUnit::Images => "images",
            ProgressUnit::Epochs => "epochs",
            ProgressUnit::Draws => "draws",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "images" => Some(ProgressUnit::Images),
            "epochs" => Some(ProgressUnit::Epochs),
            "draws" => Some(ProgressUnit::Draws),
            _ => None,
        }
    }
}

/// Builds a job, deriving its id from `identity` (the result-determining subset of params).
pub struct JobBuilder {
    pub kind: &'static str,
    /// Bumped when a kind's implementation changes its results, so old results are not reused.
    pub version: u32,
    pub label: String,
    pub params: serde_json::Value,
    pub identity: serde_json::Value,
    pub deps: Vec<JobId>,
}

impl JobBuilder {
    pub fn build(mut self) -> Job {
        self.deps.sort();
        self.deps.dedup();
        let key = serde_json::json!({
            "kind": self.kind,
            "version": self.version,
            "identity": self.identity,
            "deps": self.deps,
        });
        let id = JobId(sha256_bytes(canonical_json(&key).as_bytes())[..16].to_string());
        Job {
            id,
            kind: self.kind.to_string(),
            label: self.label,
            params: self.params,
            deps: self.deps,
            unit: ProgressUnit::default(),
        }
    }
}

/// What the store keeps about a study besides its jobs.
#[derive(Clone, Debug, Serialize)]
pub struct StudyMeta {
    pub name: String,
    pub seed: u64,
    pub spec_path: PathBuf,
    pub spec_text: String,
    pub spec_sha256: String,
    /// The caps recording gives the study's jobs.
    pub retries: crate::spec::Retries,
}

/// A study's jobs in dependency order (every job after its deps).
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub study: StudyMeta,
    pub jobs: Vec<Job>,
    /// Which grid cell each result-producing job answers, for reports. A job is shared by every
    /// cell (and study) that needs it, and its label is one study's wording of one cell, so only
    /// this mapping says which method and hyperparameters a result stands for.
    pub cells: Vec<CellRecord>,
}

/// One grid cell and the jobs whose results belong to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CellRecord {
    /// Position in the expanded grid.
    pub cell: usize,
    pub method: String,
    /// The cell's parameters as the spec gave them (`method` included).
    pub values: BTreeMap<String, serde_json::Value>,
    pub outputs: Vec<CellOutput>,
}

/// A certification (or clean-accuracy) job of a cell.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CellOutput {
    pub job: JobId,
    pub kind: String,
    /// The σ the job certifies at (`None` for clean accuracy).
    pub sigma: Option<f64>,
    /// The σ the certified model was trained at, when it was trained under noise (an ensemble
    /// member certified at another σ has `trained_sigma != sigma`).
    pub trained_sigma: Option<f64>,
}

impl CellRecord {
    fn new(index: usize, cell: &Cell, planned: &PlannedCell) -> Self {
        CellRecord {
            cell: index,
            method: planned.method.clone(),
            values: cell
                .params
                .iter()
                .map(|(k, p)| (k.clone(), p.value.clone()))
                .collect(),
            outputs: planned.outputs.clone(),
        }
    }
}

/// What a method makes of one grid cell: its jobs (shared upstream jobs included; the planner
/// deduplicates them) and which of them answer the cell.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedCell {
    pub method: String,
    pub jobs: Vec<Job>,
    pub outputs: Vec<CellOutput>,
}

/// How grid cells become jobs. The planner knows no method: `crate::methods` implements this
/// trait and the caller passes it in, so this module depends on nothing above it.
pub trait CellPlanner {
    fn plan_cell(&self, cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<PlannedCell, SpecError>;

    /// Plan-wide rewrites once every cell is expanded (e.g. fusing jobs that can share work).
    fn finalize(&self, _jobs: &mut Vec<Job>) {}
}

/// Shared state while planning: the spec, and file hashes computed once per plan.
pub struct PlanContext<'a> {
    pub spec: &'a Spec,
    hashes: HashMap<PathBuf, String>,
}

impl<'a> PlanContext<'a> {
    pub fn new(spec: &'a Spec) -> Self {
        Self {
            spec,
            hashes: HashMap::new(),
        }
    }

    /// SHA-256 of a file's contents, cached for the duration of the plan.
    pub fn file_sha256(&mut self, path: &Path) -> Result<String, SpecError> {
        if let Some(h) = self.hashes.get(path) {
            return Ok(h.clone());
        }
        let h = crate::util::sha256_file(path).map_err(|e| {
            SpecError::whole_file(
                &self.spec.path,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        self.hashes.insert(path.to_path_buf(), h.clone());
        Ok(h)
    }

    /// A digest computed once per plan under `key` (e.g. an image folder's fingerprint, which
    /// stats or reads every image): `compute` runs on the first request only.
    pub fn cached_digest(
        &mut self,
        key: &Path,
        compute: impl FnOnce() -> Result<String, SpecError>,
    ) -> Result<String, SpecError> {
        if let Some(h) = self.hashes.get(key) {
            return Ok(h.clone());
        }
        let h = compute()?;
        self.hashes.insert(key.to_path_buf(), h.clone());
        Ok(h)
    }

    /// An error pointing at a cell parameter.
    pub fn error_at(&self, span: crate::spec::Span, message: impl Into<String>) -> SpecError {
        SpecError::at(&self.spec.path, span, message)
    }
}

impl Plan {
    /// Expands every grid cell through `planner` and deduplicates shared jobs.
    pub fn from_spec(spec: &Spec, planner: &dyn CellPlanner) -> Result<Plan, SpecError> {
        let mut ctx = PlanContext::new(spec);
        let mut jobs: Vec<Job> = Vec::new();
        let mut seen: BTreeMap<JobId, usize> = BTreeMap::new();
        let mut cells = Vec::with_capacity(spec.cells.len());
        for (index, cell) in spec.cells.iter().enumerate() {
            let planned = planner.plan_cell(cell, &mut ctx)?;
            cells.push(CellRecord::new(index, cell, &planned));
            for job in planned.jobs {
                if !seen.contains_key(&job.id) {
                    seen.insert(job.id.clone(), jobs.len());
                    jobs.push(job);
                }
            }
        }
        planner.finalize(&mut jobs);
        let jobs = topo_sort(jobs).map_err(|m| SpecError::whole_file(&spec.path, m))?;
        Ok(Plan {
            study: StudyMeta {
                name: spec.name.clone(),
                seed: spec.seed,
                spec_path: spec.path.clone(),
                spec_text: spec.text.clone(),
                spec_sha256: spec.sha256.clone(),
                retries: spec.retries,
            },
            jobs,
            cells,
        })
    }

    /// Jobs as `{id, kind, label, params, deps}` JSON, for scripts.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "study": self.study.name,
            "seed": self.study.seed,
            "spec_sha256": self.study.spec_sha256,
            "jobs": self.jobs,
            "cells": self.cells,
        })
    }
}

/// Orders jobs so that every job follows its deps, keeping the planned order otherwise.
fn topo_sort(jobs: Vec<Job>) -> Result<Vec<Job>, String> {
    let index: HashMap<JobId, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.id.clone(), i))
        .collect();
    for j in &jobs {
        if let Some(d) = j.deps.iter().find(|d| !index.contains_key(*d)) {
            return Err(format!(
                "internal planning error: job {} depends on unknown job {d}",
                j.id
            ));
        }
    }
    // 0 = unvisited, 1 = on the stack, 2 = emitted.
    let mut state = vec![0u8; jobs.len()];
    let mut order = Vec::with_capacity(jobs.len());
    for start in 0..jobs.len() {
        let mut stack = vec![(start, 0usize)];
        while let Some((i, next_dep)) = stack.pop() {
            if next_dep == 0 {
                if state[i] == 2 {
                    continue;
                }
                state[i] = 1;
            }
            if let Some(d) = jobs[i].deps.get(next_dep) {
                stack.push((i, next_dep + 1));
                let di = index[d];
                match state[di] {
                    0 => stack.push((di, 0)),
                    1 => return Err(format!("dependency cycle through job {}", jobs[di].id)),
                    _ => {}
                }
            } else if state[i] != 2 {
                state[i] = 2;
                order.push(i);
            }
        }
    }
    let mut slots: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// Jobs and plans of a test job kind, for the tests of every module that stores or runs jobs.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A job of `kind` named `name` (its only parameter), depending on `deps`.
    pub fn job(kind: &'static str, name: &str, deps: &[&Job]) -> Job {
        JobBuilder {
            kind,
            version: 1,
            label: name.into(),
            params: serde_json::json!({ "name": name }),
            identity: serde_json::json!({ "name": name }),
            deps: deps.iter().map(|j| j.id.clone()).collect(),
        }
        .build()
    }

    /// A study `name` of `jobs`, whose revision changes with the number of jobs.
    pub fn plan(name: &str, jobs: Vec<Job>) -> Plan {
        Plan {
            study: StudyMeta {
                name: name.into(),
                seed: 0,
                spec_path: "spec.yaml".into(),
                spec_text: format!("name: {name}"),
                spec_sha256: crate::util::sha256_bytes(format!("{name}{}", jobs.len()).as_bytes()),
                retries: Default::default(),
            },
            jobs,
            cells: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, deps: &[&Job]) -> Job {
        testing::job("test", name, deps)
    }

    #[test]
    fn ids_depend_on_identity_and_deps_only() {
        let a = job("a", &[]);
        let a2 = JobBuilder {
            kind: "test",
            version: 1,
            label: "other label".into(),
            params: serde_json::json!({ "name": "a", "path": "/elsewhere" }),
            identity: serde_json::json!({ "name": "a" }),
            deps: vec![],
        }
        .build();
        assert_eq!(a.id, a2.id);
        let b = job("b", &[&a]);
        let b_without_dep = job("b", &[]);
        assert_ne!(b.id, b_without_dep.id);
        assert_eq!(a.id.as_str().len(), 16);
    }

    #[test]
    fn topological_order_puts_deps_first_and_detects_cycles() {
        let a = job("a", &[]);
        let b = job("b", &[&a]);
        let c = job("c", &[&b, &a]);
        let sorted = topo_sort(vec![c.clone(), b.clone(), a.clone()]).unwrap();
        let pos = |id: &JobId| sorted.iter().position(|j| &j.id == id).unwrap();
        assert!(pos(&a.id) < pos(&b.id) && pos(&b.id) < pos(&c.id));
        let mut x = job("x", &[]);
        let y = job("y", &[&x]);
        x.deps.push(y.id.clone());
        assert!(topo_sort(vec![x, y]).unwrap_err().contains("cycle"));
    }
}
