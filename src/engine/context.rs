//! The template context of a run's steps, built so that a step costs the same however long
//! the run is: the variables and the run's facts are converted to minijinja values once per
//! run, each node's entry (`{output, status, error}`) once when the node finishes, and
//! `nodes` reaches templates as a lazy view of that shared table, not a copy per step.
//!
//! A view sees exactly the nodes that had finished when it was made (as the copy it replaces
//! did): entries carry the order in which nodes finished, and a view hides the later ones.

use crate::blueprint::Blueprint;
use crate::template::Context;
use minijinja::value::{Enumerator, Object, ObjectRepr, Value as MjValue};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// What every step of a run sees besides `nodes`, converted once per run.
pub(crate) struct RunValues {
    vars: MjValue,
    run: MjValue,
}

impl RunValues {
    pub(crate) fn new(variables: &Map<String, Value>, run: &Value) -> RunValues {
        RunValues {
            vars: MjValue::from_serialize(variables),
            run: MjValue::from_serialize(run),
        }
    }

    /// The run's variables (they serialize as the JSON recorded with the run).
    pub(crate) fn vars(&self) -> &MjValue {
        &self.vars
    }
}

/// The finished nodes of one run, in blueprint order. Written by the run's driver only, each
/// node once; read by the steps' templates from any thread.
#[derive(Debug)]
pub(crate) struct Finished {
    ids: Vec<String>,
    index: HashMap<String, usize>,
    /// Per node: when it finished (0 for the first to finish) and its entry.
    slots: Vec<OnceLock<(usize, MjValue)>>,
    count: AtomicUsize,
}

impl Finished {
    pub(crate) fn new(bp: &Blueprint) -> Arc<Finished> {
        let ids: Vec<String> = bp.nodes.iter().map(|n| n.id.clone()).collect();
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Arc::new(Finished {
            slots: ids.iter().map(|_| OnceLock::new()).collect(),
            ids,
            index,
            count: AtomicUsize::new(0),
        })
    }

    /// Node `i` succeeded with `output` (converted here, once).
    pub(crate) fn done(&self, i: usize, output: &Value) {
        self.put(
            i,
            MjValue::from_iter([
                ("output", MjValue::from_serialize(output)),
                ("status", MjValue::from("success")),
            ]),
        );
    }

    /// Node `i` failed but says `continueOnError`: dependents see a null output and the error.
    pub(crate) fn failed_continue(&self, i: usize, message: &str) {
        self.put(
            i,
            MjValue::from_iter([
                ("output", MjValue::from(())),
                ("status", MjValue::from("error")),
                ("error", MjValue::from(message)),
            ]),
        );
    }

    /// Node `i` was skipped.
    pub(crate) fn skipped(&self, i: usize) {
        self.put(
            i,
            MjValue::from_iter([
                ("output", MjValue::from(())),
                ("status", MjValue::from("skipped")),
            ]),
        );
    }

    fn put(&self, i: usize, entry: MjValue) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        // A node finishes once; the driver never reports one twice, and if it did the
        // first entry would stay (what earlier views already showed).
        if slot.get().is_none() {
            let order = self.count.load(Ordering::SeqCst);
            if slot.set((order, entry)).is_ok() {
                self.count.store(order + 1, Ordering::SeqCst);
            }
        }
    }

    /// The context of a step planned now: `vars`, `run`, and `nodes` as a view of the nodes
    /// finished so far. Costs a few allocations, whatever the run's size.
    pub(crate) fn context(self: &Arc<Self>, run: &RunValues) -> Context {
        let nodes = NodesView {
            table: self.clone(),
            visible: self.count.load(Ordering::SeqCst),
        };
        Context::from_value(MjValue::from_iter([
            ("vars", run.vars.clone()),
            ("nodes", MjValue::from_object(nodes)),
            ("run", run.run.clone()),
        ]))
    }
}

/// `nodes` as one step's templates see it: a map from node id to its entry, holding the
/// nodes that had finished when the step was planned.
#[derive(Debug)]
struct NodesView {
    table: Arc<Finished>,
    visible: usize,
}

impl NodesView {
    fn entry(&self, i: usize) -> Option<&MjValue> {
        match self.table.slots.get(i)?.get() {
            Some((order, entry)) if *order < self.visible => Some(entry),
            _ => None,
        }
    }
}

impl Object for NodesView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &MjValue) -> Option<MjValue> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<MjValue> {
        let i = *self.table.index.get(key)?;
        self.entry(i).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        // Blueprint order, like the object this view replaces. Only a template that walks
        // `nodes` as a whole pays for the walk.
        let this = self.clone();
        let n = this.table.ids.len();
        Enumerator::KeyValueIter(Box::new((0..n).filter_map(move |i| {
            let entry = this.entry(i)?.clone();
            Some((MjValue::from(this.table.ids[i].as_str()), entry))
        })))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        // The first `visible` nodes to finish, and only they, are shown.
        Some(self.visible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Templates;
    use serde_json::json;

    fn blueprint() -> Blueprint {
        serde_json::from_value(json!({
            "name": "view",
            "nodes": [
                { "id": "a", "type": "transform", "template": "x" },
                { "id": "b", "type": "transform", "template": "x" },
                { "id": "c", "type": "transform", "template": "x" },
                { "id": "d", "type": "transform", "template": "x" }
            ]
        }))
        .unwrap()
    }

    #[test]
    fn templates_read_the_view_as_they_read_the_copy_it_replaces() {
        let t = Templates::new();
        let finished = Finished::new(&blueprint());
        let run = RunValues::new(
            json!({ "NAME": "Ada" }).as_object().unwrap(),
            &json!({ "id": "r1", "blueprint": "view", "sandbox": true }),
        );
        finished.done(2, &json!({ "items": [{ "title": "First" }] }));
        finished.failed_continue(0, "boom");
        let before_b = finished.context(&run);
        finished.skipped(1);
        let ctx = finished.context(&run);

        // The same context as a JSON object, in the shape the engine used to copy.
        let copy = Context::new(json!({
            "vars": { "NAME": "Ada" },
            "nodes": {
                "a": { "output": null, "status": "error", "error": "boom" },
                "b": { "output": null, "status": "skipped" },
                "c": { "output": { "items": [{ "title": "First" }] }, "status": "success" }
            },
            "run": { "id": "r1", "blueprint": "view", "sandbox": true }
        }));
        for template in [
            "{{ nodes.c.output.items[0].title }} {{ nodes['a'].error }} {{ nodes.b.status }}",
            "{{ nodes }}",
            "{{ nodes | length }} {% for k, v in nodes | items %}{{ k }}={{ v.status }};{% endfor %}",
            "{{ nodes | tojson }}",
            "{{ vars.NAME }} {{ run.id }} {{ run.sandbox }}",
            "{% if nodes.d is defined %}d{% else %}no d{% endif %}",
        ] {
            assert_eq!(
                t.render_in(template, &ctx).unwrap(),
                t.render_in(template, &copy).unwrap(),
                "{template}"
            );
        }
        assert_eq!(
            t.render_in("{% for k in nodes %}{{ k }}{% endfor %}", &ctx)
                .unwrap(),
            "abc"
        );
        assert_eq!(ctx.to_json(), copy.to_json());

        // A view shows the nodes finished when it was made, not those that finished later.
        assert_eq!(
            t.render_in("{{ nodes | length }} {{ nodes.b is defined }}", &before_b)
                .unwrap(),
            "2 False"
        );
        let e = t.render_in("{{ nodes.b.output }}", &before_b).unwrap_err();
        assert!(e.message.contains("nodes.b"), "{}", e.message);
        let e = t.render_in("{{ nodes.d.output }}", &ctx).unwrap_err();
        assert!(e.message.contains("nodes.d.output"), "{}", e.message);
    }
}
