//! Compiling a query for this node: the filter bound to the schema, the statistic the
//! registry names bound to it, and the consent scopes it needs; then evaluating it over the
//! cohort it selects. The one place that joins binding, cohorts and statistics.

use renkei_protocol::{Query, Release};

use std::sync::Arc;

use crate::bind::{Binder, Node, SchemaError};
use crate::image::{Dataset, View};
use crate::per_patient::BoundTable;
use crate::schema::SECONDARY_USE;
use crate::statistic::{self, Accumulator, Exact, NoisyPart, Part};

/// A query the dataset accepts, ready to run.
#[derive(Debug)]
pub struct CompiledQuery {
    pub(crate) view: View,
    pub(crate) filter: Node,
    /// The bound statistic: its released parts, and how it counts and releases.
    pub(crate) statistic: Box<dyn Accumulator>,
    /// Consent scopes a patient must have given to be counted.
    pub required_consents: Vec<String>,
    /// The `WITH` table the query ranges over, if it names one.
    pub(crate) per_patient: Option<BoundTable>,
}

impl CompiledQuery {
    /// The released quantities, each with its sensitivity and length; each gets its own
    /// mechanism.
    pub fn parts(&self) -> Vec<Part> {
        self.statistic.parts()
    }

    /// Digits after the point of released sums and bins (the measured column's scale).
    pub fn value_scale(&self) -> u8 {
        self.statistic.value_scale()
    }

    /// Whether any released part is a count (to which a minimum cell size applies).
    pub fn counts(&self) -> bool {
        self.parts().iter().any(|p| p.counts)
    }

    /// Whether the answer must say the minimum cell size: some part is a count, or the
    /// aggregator applies it to what it reads from the release.
    pub fn reports_min_cell(&self) -> bool {
        self.counts() || self.statistic.withholds_when_combined()
    }

    /// Whether the release is a vector (a histogram or cells): released under zCDP only.
    pub fn vector(&self) -> bool {
        self.statistic.vector()
    }

    /// The bound statistic.
    pub fn statistic(&self) -> &dyn Accumulator {
        self.statistic.as_ref()
    }

    /// The wire form of an exact result with no noise and nothing withheld: what tests
    /// compare against a reference. The node never sends it.
    pub fn unnoised_release(&self, exact: Exact) -> Release {
        self.statistic
            .release(exact.0.into_iter().map(NoisyPart::plain).collect())
    }
}

impl Dataset {
    /// Binds `query` to this dataset, or says which part does not fit.
    pub fn compile(&self, query: &Query) -> Result<CompiledQuery, SchemaError> {
        if let Some(table) = &query.per_patient {
            // The outer query binds to the table's schema as to `patients`.
            let table = self.bind_per_patient(table)?;
            let shell = Dataset::empty(Arc::clone(&table.schema));
            let mut compiled = shell.compile_on(query, View::Patients, table.consents.clone())?;
            compiled.per_patient = Some(table);
            return Ok(compiled);
        }
        let view = self.view(&query.view)?;
        let mut consents = vec![SECONDARY_USE.to_string()];
        if let View::Items(k) = view
            && let Some(scope) = &self.schema.items[k].consent
        {
            consents.push(scope.clone());
        }
        self.compile_on(query, view, consents)
    }

    fn compile_on(
        &self,
        query: &Query,
        view: View,
        consents: Vec<String>,
    ) -> Result<CompiledQuery, SchemaError> {
        let mut binder = Binder::new(self, &query.view, view, consents);
        let filter = binder.filter(&query.filter)?;
        let statistic = statistic::for_query(query).bind(query, &mut binder)?;
        let required_consents = binder.into_consents();
        Ok(CompiledQuery {
            view,
            filter,
            statistic,
            required_consents,
            per_patient: None,
        })
    }

    /// The exact answer of a compiled query over consenting patients. Never leaves the node
    /// without noise.
    pub fn evaluate(&self, query: &CompiledQuery) -> Exact {
        match &query.per_patient {
            None => {
                let cohort = self.cohort(query.view, &query.filter, &query.required_consents);
                query.statistic.evaluate(&cohort)
            }
            Some(table) => {
                let table = self.per_patient(table);
                let cohort = table.cohort(query.view, &query.filter, &query.required_consents);
                query.statistic.evaluate(&cohort)
            }
        }
    }
}
