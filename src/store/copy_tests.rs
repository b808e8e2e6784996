//! `caf db copy`'s store side on every backend: a study goes from a fresh SQLite file to the
//! fixture's database and on to another SQLite file with every kind of row intact, copying
//! again changes nothing, and different content already there is refused.

use std::time::Duration;

use super::testing::{on_every_backend, Fixture, SqliteFixture};
use super::*;
use crate::plan::testing::plan;
use crate::plan::{CellOutput, CellRecord, Job};

fn job(name: &str, deps: &[&Job]) -> Job {
    crate::plan::testing::job("test", name, deps)
}

fn w(name: &str) -> WorkerId {
    WorkerId(name.into())
}

const LEASE: Duration = Duration::from_secs(30);

on_every_backend!(
    a_study_travels_sqlite_to_the_backend_and_back_with_every_row,
    a_study_with_other_content_or_a_disagreeing_shared_job_is_refused,
);

fn cert(idx: u64, radius: f64) -> CertRow {
    CertRow {
        idx,
        label: 3,
        predict: 3,
        radius,
        correct: true,
        c_hat: 3,
        n_a: 97,
        n: 100,
        n0: 10,
        alpha: 0.001,
        sigma: 0.25,
        seconds: 0.125,
        sequential: None,
    }
}

fn cells(jobs: &[&Job]) -> Vec<CellRecord> {
    jobs.iter()
        .enumerate()
        .map(|(i, j)| CellRecord {
            cell: i,
            method: "smooth".into(),
            values: [("sigma".to_string(), serde_json::json!(0.25))]
                .into_iter()
                .collect(),
            outputs: vec![CellOutput {
                job: j.id.clone(),
                kind: "certify".into(),
                sigma: Some(0.25),
                trained_sigma: None,
            }],
        })
        .collect()
}

/// A study with a finished training job (epochs, weights), a finished certify job depending on
/// it (results, events), a failed one, an eval job and one still running.
async fn populate(s: &impl Store) -> StudyId {
    let train = job("train", &[]);
    let cert_a = job("cert-a", &[&train]);
    let cert_b = job("cert-b", &[]);
    let ev = job("eval", &[]);
    let running = job("running", &[]);
    let mut p = plan(
        "travel",
        vec![
            train.clone(),
            cert_a.clone(),
            cert_b.clone(),
            ev.clone(),
            running.clone(),
        ],
    );
    p.cells = cells(&[&cert_a, &cert_b]);
    let study = s.register_plan(&p).await.unwrap();
    let me = w("node7:42:beef");
    let info = WorkerInfo {
        host: "node7".into(),
        pid: 42,
        cpu: "AMD EPYC test".into(),
        device: "cpu".into(),
        slurm_job_id: None,
        slurm_array_job_id: None,
        slurm_array_task_id: None,
        studies: vec![],
    };
    s.register_worker(&me, &info).await.unwrap();
    let claim = |id: &JobId| {
        let id = id.clone();
        let me = me.clone();
        async move {
            let c = s
                .claim(study, &me, &["test"], LEASE)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(c.id, id);
        }
    };
    claim(&train.id).await;
    s.record_epoch(
        &lease(&train.id, &me),
        &train.id,
        0,
        &serde_json::json!({"train_loss": 2.5, "images_per_sec": 80.0}),
    )
    .await
    .unwrap();
    s.record_artifact(
        &lease(&train.id, &me),
        &Artifact {
            name: "weights".into(),
            path: "/shared/runs/artifacts/x/final.safetensors".into(),
            sha256: "ab".repeat(32),
            bytes: 1234,
        },
    )
    .await
    .unwrap();
    s.log_event(Some(&train.id), Some(&me), "info", "attempt 1 started")
        .await
        .unwrap();
    assert!(s
        .complete(
            &train.id,
            &me,
            "cpu",
            &serde_json::json!({"epochs": 1}),
            3.0
        )
        .await
        .unwrap());
    claim(&cert_a.id).await;
    for i in 0..3 {
        s.record_cert(
            &lease(&cert_a.id, &me),
            &cert_a.id,
            &cert(i * 20, 0.1 * i as f64),
        )
        .await
        .unwrap();
    }
    s.set_progress(&lease(&cert_a.id, &me), 3, 3).await.unwrap();
    assert!(s
        .complete(
            &cert_a.id,
            &me,
            "cpu",
            &serde_json::json!({"images": 3}),
            1.5
        )
        .await
        .unwrap());
    claim(&cert_b.id).await;
    s.fail(&cert_b.id, &me, "attempt 1/3: no such file", None, 0.5)
        .await
        .unwrap();
    claim(&ev.id).await;
    s.record_eval(
        &lease(&ev.id, &me),
        &ev.id,
        &[EvalRow {
            idx: 0,
            label: 1,
            predict: 1,
        }],
    )
    .await
    .unwrap();
    assert!(s
        .complete(&ev.id, &me, "cpu", &serde_json::json!({}), 0.2)
        .await
        .unwrap());
    claim(&running.id).await;
    s.record_cert(&lease(&running.id, &me), &running.id, &cert(0, 0.3))
        .await
        .unwrap();
    study
}

/// What reports and exports read of a study, for comparing two databases.
async fn view(s: &impl Store, name: &str) -> serde_json::Value {
    let info = s.study_by_name(name).await.unwrap();
    let jobs = s.study_jobs(info.id).await.unwrap();
    let mut epochs = Vec::new();
    let mut artifacts = Vec::new();
    for j in &jobs {
        epochs.push(s.epochs(&j.id).await.unwrap());
        artifacts.push(s.artifact(&j.id, "weights").await.unwrap());
    }
    let jobs: Vec<serde_json::Value> = jobs
        .iter()
        .map(|j| {
            serde_json::json!([
                j.id,
                j.kind,
                j.label,
                j.state,
                j.blocked,
                j.attempts,
                j.progress_done,
                j.progress_total,
                j.run_seconds,
                j.error,
                j.result,
                j.unit,
                j.lease_owner
            ])
        })
        .collect();
    serde_json::json!({
        "study": [info.name, info.seed, info.spec_path, info.spec_sha256, info.spec_text],
        "jobs": jobs,
        "cells": serde_json::to_value(s.study_cells(info.id).await.unwrap()).unwrap(),
        "cert": serde_json::to_value(s.study_cert_results(info.id).await.unwrap()).unwrap(),
        "epochs": epochs,
        "artifacts": artifacts,
    })
}

async fn a_study_travels_sqlite_to_the_backend_and_back_with_every_row(f: impl Fixture) {
    let origin_f = SqliteFixture::new();
    let origin = origin_f.open().await;
    populate(&origin).await;
    // Another study first, so the copy's study id differs from the origin's.
    let middle = f.open().await;
    middle
        .register_plan(&plan("other", vec![job("x", &[])]))
        .await
        .unwrap();

    let dump = origin.dump_study("travel").await.unwrap().unwrap();
    assert_eq!(dump.released, 1, "the running job is copied as pending");
    let out = middle.load_study(&dump).await.unwrap();
    assert!(
        matches!(
            out,
            CopyOutcome::Copied {
                jobs: 5,
                shared: 0,
                released: 1,
                ..
            }
        ),
        "{out:?}"
    );
    // Copying again changes nothing.
    assert_eq!(
        middle.load_study(&dump).await.unwrap(),
        CopyOutcome::Identical
    );

    let back_f = SqliteFixture::new();
    let back = back_f.open().await;
    let dump2 = middle.dump_study("travel").await.unwrap().unwrap();
    back.load_study(&dump2).await.unwrap();

    let (o, m, b) = (
        view(&origin, "travel").await,
        view(&middle, "travel").await,
        view(&back, "travel").await,
    );
    assert_eq!(m, b);
    // The origin differs only in the job it was still running.
    let running = |v: &serde_json::Value| v["jobs"][4].clone();
    assert_eq!(running(&o)[3], "running");
    assert_eq!(running(&m)[3], "pending");
    assert_eq!(running(&m)[5], 0, "its attempt is handed back");
    assert_eq!(running(&m)[12], serde_json::Value::Null, "no lease");
    let without = |v: &serde_json::Value| {
        let mut v = v.clone();
        v["jobs"][4] = serde_json::Value::Null;
        v
    };
    assert_eq!(without(&o), without(&b));
    assert_eq!(o["cert"].as_array().unwrap().len(), 4, "{o}");
    assert_eq!(b["jobs"][2][3], "failed");
    assert_eq!(b["jobs"][1][4], false);

    // Every table arrives: eval rows, events, revisions (the dumps agree row for row, study
    // ids aside).
    assert_eq!(
        copy::first_difference(&dump, &dump2, true),
        None,
        "origin and copy differ"
    );
    assert_eq!(dump2.rows("eval_results").len(), 1);
    assert_eq!(dump2.rows("events").len(), dump.rows("events").len());
    assert!(!dump2.rows("events").is_empty());
    assert_eq!(dump2.rows("study_revisions").len(), 1);
    // The copy's jobs run there: the released job is claimable again.
    let c = back
        .claim(
            back.study_by_name("travel").await.unwrap().id,
            &w("laptop"),
            &["test"],
            LEASE,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.label, "running");
    assert_eq!(back.cert_done(&c.id).await.unwrap(), vec![0]);
}

async fn a_study_with_other_content_or_a_disagreeing_shared_job_is_refused(f: impl Fixture) {
    let origin_f = SqliteFixture::new();
    let origin = origin_f.open().await;
    let a = job("a", &[]);
    let b = job("b", &[]);
    let study = origin
        .register_plan(&plan("s", vec![a.clone(), b.clone()]))
        .await
        .unwrap();
    let me = w("w");
    origin.claim(study, &me, &["test"], LEASE).await.unwrap();
    origin
        .record_cert(&lease(&a.id, &me), &a.id, &cert(0, 0.5))
        .await
        .unwrap();
    origin
        .complete(&a.id, &me, "cpu", &serde_json::json!({}), 1.0)
        .await
        .unwrap();
    let dst = f.open().await;
    dst.load_study(&origin.dump_study("s").await.unwrap().unwrap())
        .await
        .unwrap();

    // The origin moves on: b now has a result, so the destination's copy is out of date.
    origin.claim(study, &me, &["test"], LEASE).await.unwrap();
    origin
        .record_cert(&lease(&b.id, &me), &b.id, &cert(0, 0.25))
        .await
        .unwrap();
    let err = dst
        .load_study(&origin.dump_study("s").await.unwrap().unwrap())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Conflict(_)), "{msg}");
    assert!(
        msg.contains("study `s`") && msg.contains("cert_results"),
        "{msg}"
    );
    // Nothing was written: the destination still shows one result.
    let there = dst.study_by_name("s").await.unwrap();
    assert_eq!(dst.study_cert_results(there.id).await.unwrap().len(), 1);

    // Another study sharing job a, whose copy in the destination has a different result.
    let other_f = SqliteFixture::new();
    let other = other_f.open().await;
    let st = other
        .register_plan(&plan("t", vec![a.clone()]))
        .await
        .unwrap();
    other.claim(st, &me, &["test"], LEASE).await.unwrap();
    other
        .record_cert(&lease(&a.id, &me), &a.id, &cert(0, 0.75))
        .await
        .unwrap();
    other
        .complete(&a.id, &me, "cpu", &serde_json::json!({}), 1.0)
        .await
        .unwrap();
    let err = dst
        .load_study(&other.dump_study("t").await.unwrap().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(a.id.as_str()) && err.contains("radius = 0.75"),
        "{err}"
    );
    assert!(matches!(
        dst.study_by_name("t").await,
        Err(StoreError::NotFound(_))
    ));

    // With the same result it is shared, and its rows are not duplicated.
    let same_f = SqliteFixture::new();
    let same = same_f.open().await;
    let st = same
        .register_plan(&plan("u", vec![a.clone()]))
        .await
        .unwrap();
    same.claim(st, &me, &["test"], LEASE).await.unwrap();
    same.record_cert(&lease(&a.id, &me), &a.id, &cert(0, 0.5))
        .await
        .unwrap();
    same.complete(&a.id, &me, "cpu", &serde_json::json!({}), 9.0)
        .await
        .unwrap();
    let out = dst
        .load_study(&same.dump_study("u").await.unwrap().unwrap())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            CopyOutcome::Copied {
                jobs: 1,
                shared: 1,
                ..
            }
        ),
        "{out:?}"
    );
    let u = dst.study_by_name("u").await.unwrap();
    assert_eq!(dst.study_cert_results(u.id).await.unwrap().len(), 1);
}

fn lease(job: &JobId, worker: &WorkerId) -> Lease {
    Lease {
        job: job.clone(),
        worker: worker.clone(),
    }
}
