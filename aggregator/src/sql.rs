//! Researchers' SQL, compiled to the signed query AST.
//!
//! Accepted: `SELECT <aggregate> FROM <view> [WHERE …]`, or `SELECT a, [b,] COUNT(*) | SUM(col)
//! | AVG(col) FROM <view> [WHERE …] GROUP BY a[, b]` over categorical or boolean columns. The view is
//! `patients`, `timepoints` or an information kind (`ct`, `host_genome`, …). Aggregates:
//! `COUNT(*)` (patients on `patients`, rows elsewhere, each patient's rows bounded by the
//! schema), `COUNT(DISTINCT patient_id)`, `SUM(col)`, `AVG(col)`, `MEDIAN(col)` and
//! `PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY col)`. The condition combines with AND / OR /
//! NOT: comparisons (`=, <>, <, <=, >, >=`, the column on either side) with integers, exact
//! decimals, 'levels' and TRUE/FALSE; `IN (…)`; `[NOT] BETWEEN`; `IS [NOT] NULL`; `IS TRUE /
//! FALSE`; and a bare flag (`diabetes`). Anything else is an error that points at the
//! offending part of the SQL (line and column). Column names and levels are checked by each
//! node against its own schema.

use std::fmt;

use renkei_protocol::query::QueryShapeError;
use renkei_protocol::{Aggregate, CmpOp, Decimal, Filter, Literal, Query};
use sqlparser::ast::{
    self, BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    ObjectNamePart, SelectItem, SetExpr, Spanned, Statement, TableFactor, UnaryOperator, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// A problem in the researcher's SQL, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SqlError {
    pub message: String,
    /// 1-based; 0 when the position is not known.
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.message
            )
        } else {
            f.write_str(&self.message)
        }
    }
}

impl SqlError {
    fn at(node: &impl Spanned, message: impl Into<String>) -> Self {
        let start = node.span().start;
        Self {
            message: message.into(),
            line: start.line,
            column: start.column,
        }
    }

    fn nowhere(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            line: 0,
            column: 0,
        }
    }

    /// The SQL line with a caret under the error, for terminals.
    pub fn render(&self, sql: &str) -> String {
        let Some(line) = sql.lines().nth(self.line.saturating_sub(1) as usize) else {
            return self.to_string();
        };
        if self.line == 0 {
            return self.to_string();
        }
        let pad = " ".repeat(self.column.saturating_sub(1) as usize);
        format!("{self}\n  {line}\n  {pad}^")
    }
}

impl From<QueryShapeError> for SqlError {
    fn from(e: QueryShapeError) -> Self {
        SqlError::nowhere(e.to_string())
    }
}

/// Compiles one SQL statement to a canonical [`Query`].
pub fn compile(sql: &str) -> Result<Query, SqlError> {
    let statements = Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| {
        let text = e.to_string();
        // sqlparser reports positions as "… at Line: L, Column: C".
        let (line, column) = parse_position(&text)
            .or_else(|| text.ends_with("found: EOF").then(|| end_position(sql)))
            .unwrap_or((0, 0));
        SqlError {
            message: text
                .trim_start_matches("sql parser error: ")
                .split(" at Line:")
                .next()
                .unwrap_or(&text)
                .to_string(),
            line,
            column,
        }
    })?;
    let [statement] = statements.as_slice() else {
        return Err(SqlError::nowhere(format!(
            "expected exactly one SELECT statement, found {}",
            statements.len()
        )));
    };
    let Statement::Query(query) = statement else {
        return Err(SqlError::at(statement, "only SELECT queries are accepted"));
    };
    // Every clause not understood here is refused, never ignored: ignoring one would answer
    // (and charge for) a different question than the one written.
    if query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.with.is_some()
        || query.fetch.is_some()
        || !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return Err(SqlError::at(
            query.as_ref(),
            "only SELECT … FROM … WHERE … is supported (no WITH, ORDER BY, LIMIT, FETCH, FOR or pipes)",
        ));
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(SqlError::at(
            query.body.as_ref(),
            "only a plain SELECT is supported (no UNION, VALUES or subqueries)",
        ));
    };
    if select.distinct.is_some() || select.having.is_some() {
        return Err(SqlError::at(
            select.as_ref(),
            "DISTINCT and HAVING are not supported yet",
        ));
    }
    if !select.optimizer_hints.is_empty()
        || select.select_modifiers.is_some()
        || select.top.is_some()
        || select.exclude.is_some()
        || select.into.is_some()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || !select.named_window.is_empty()
        || select.qualify.is_some()
        || select.value_table_mode.is_some()
    {
        return Err(SqlError::at(
            select.as_ref(),
            "this SELECT uses a clause renkei does not support (TOP, INTO, QUALIFY, WINDOW, …)",
        ));
    }
    let view = view_name(select)?;
    let group_by = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs
            .iter()
            .map(|e| {
                column_name(e, &view)?.ok_or_else(|| SqlError::at(e, "GROUP BY takes column names"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(SqlError::at(
                select.as_ref(),
                "GROUP BY ALL and ROLLUP/CUBE are not supported",
            ));
        }
    };
    let aggregate = projection(select, &view, &group_by)?;
    let filter = match &select.selection {
        Some(condition) => filter(condition, &view)?,
        None => Filter::True,
    };
    let query = Query {
        view,
        aggregate,
        filter,
        group_by,
    }
    .canonical();
    query.check_shape()?;
    Ok(query)
}

/// Line and column just past the last character of `sql`.
fn end_position(sql: &str) -> (u64, u64) {
    let trimmed = sql.trim_end();
    let line = trimmed.lines().count().max(1) as u64;
    let column = trimmed.lines().last().map_or(0, |l| l.chars().count()) as u64 + 1;
    (line, column)
}

fn parse_position(text: &str) -> Option<(u64, u64)> {
    let rest = text.split("Line: ").nth(1)?;
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

fn view_name(select: &ast::Select) -> Result<String, SqlError> {
    let [table] = select.from.as_slice() else {
        return Err(SqlError::at(
            select,
            "expected FROM with exactly one view, e.g. FROM patients",
        ));
    };
    if !table.joins.is_empty() {
        return Err(SqlError::at(
            table,
            "joins are not supported; views are already linked per patient",
        ));
    }
    let TableFactor::Table {
        name,
        alias,
        args,
        with_hints,
        version,
        with_ordinality,
        partitions,
        json_path,
        sample,
        index_directives,
        inheritance,
    } = &table.relation
    else {
        return Err(SqlError::at(&table.relation, "expected a view name"));
    };
    if alias.is_some() {
        return Err(SqlError::at(
            &table.relation,
            "view aliases are not supported; write the view's name",
        ));
    }
    if args.is_some()
        || !with_hints.is_empty()
        || version.is_some()
        || *with_ordinality
        || !partitions.is_empty()
        || json_path.is_some()
        || sample.is_some()
        || !index_directives.is_empty()
        || inheritance.is_some()
    {
        return Err(SqlError::at(
            &table.relation,
            "expected a plain view name such as `patients`",
        ));
    }
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Ok(ident.value.to_ascii_lowercase()),
        _ => Err(SqlError::at(
            name,
            "expected a plain view name such as `patients`",
        )),
    }
}

/// The SELECT list: the GROUP BY columns (if any) and one aggregate: `COUNT(*)`,
/// `COUNT(DISTINCT patient_id)`, `SUM(col)`, `AVG(col)`, `MEDIAN(col)` or
/// `PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY col)`.
fn projection(
    select: &ast::Select,
    view: &str,
    group_by: &[String],
) -> Result<Aggregate, SqlError> {
    let expected = || {
        SqlError::at(
            select,
            "expected SELECT [group columns,] COUNT(*) | COUNT(DISTINCT patient_id) | SUM(col) | AVG(col) | MEDIAN(col) | PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY col)",
        )
    };
    let mut aggregate = None;
    let mut listed = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::UnnamedExpr(Expr::Function(function)) if aggregate.is_none() => {
                aggregate = Some(function_aggregate(function, view)?);
            }
            SelectItem::UnnamedExpr(expr) => match column_name(expr, view)? {
                Some(column) => listed.push(column),
                None => return Err(expected()),
            },
            _ => return Err(expected()),
        }
    }
    let aggregate = aggregate.ok_or_else(expected)?;
    let mut sorted_listed = listed.clone();
    sorted_listed.sort();
    let mut sorted_groups = group_by.to_vec();
    sorted_groups.sort();
    if sorted_listed != sorted_groups {
        return Err(SqlError::at(
            select,
            "the columns selected besides the aggregate must be exactly the GROUP BY columns",
        ));
    }
    let groupable = match aggregate {
        Aggregate::CountPatients
        | Aggregate::CountRows
        | Aggregate::Sum { .. }
        | Aggregate::Mean { .. } => true,
        Aggregate::Quantile { .. } => false,
    };
    if !group_by.is_empty() && !groupable {
        return Err(SqlError::at(
            select,
            "GROUP BY works with COUNT, SUM and AVG; a quantile per group is not offered yet",
        ));
    }
    Ok(aggregate)
}

/// The aggregate a function call in the SELECT list asks for.
fn function_aggregate(function: &ast::Function, view: &str) -> Result<Aggregate, SqlError> {
    let name = match function.name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => ident.value.to_ascii_lowercase(),
        _ => return Err(SqlError::at(function, "unknown aggregate")),
    };
    let FunctionArguments::List(list) = &function.args else {
        return Err(SqlError::at(function, format!("{name} needs arguments")));
    };
    if !list.clauses.is_empty()
        || function.filter.is_some()
        || function.over.is_some()
        || function.null_treatment.is_some()
        || function.uses_odbc_syntax
        || !matches!(function.parameters, FunctionArguments::None)
        || (!function.within_group.is_empty() && name != "percentile_cont")
    {
        return Err(SqlError::at(
            function,
            "aggregates take no FILTER, OVER or extra clauses; put conditions in WHERE",
        ));
    }
    let one_column = || -> Result<String, SqlError> {
        match list.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(expr))]
                if list.duplicate_treatment.is_none() =>
            {
                column_name(expr, view)?.ok_or_else(|| SqlError::at(expr, "expected a column name"))
            }
            _ => Err(SqlError::at(
                function,
                format!("{} takes one column", name.to_uppercase()),
            )),
        }
    };
    match name.as_str() {
        "count" => match (list.duplicate_treatment, list.args.as_slice()) {
            (None, [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]) => {
                Ok(if view == "patients" {
                    Aggregate::CountPatients
                } else {
                    Aggregate::CountRows
                })
            }
            (
                Some(ast::DuplicateTreatment::Distinct),
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(ident)))],
            ) if ident.value.eq_ignore_ascii_case("patient_id") => Ok(Aggregate::CountPatients),
            _ => Err(SqlError::at(
                function,
                "expected COUNT(*) or COUNT(DISTINCT patient_id)",
            )),
        },
        "sum" => Ok(Aggregate::Sum {
            column: one_column()?,
        }),
        "avg" => Ok(Aggregate::Mean {
            column: one_column()?,
        }),
        "median" => Ok(Aggregate::Quantile {
            column: one_column()?,
            per_mille: 500,
        }),
        "percentile_cont" => {
            let p = match list.args.as_slice() {
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(expr))] => match literal(expr)? {
                    Literal::Decimal(d) => renkei_protocol::query::Decimal::to_per_mille(&d),
                    _ => None,
                },
                _ => None,
            };
            let p = p.filter(|p| (1..1000).contains(p)).ok_or_else(|| {
                SqlError::at(
                    function,
                    "PERCENTILE_CONT takes a fraction strictly between 0 and 1, e.g. 0.9",
                )
            })?;
            let [order] = function.within_group.as_slice() else {
                return Err(SqlError::at(
                    function,
                    "PERCENTILE_CONT needs WITHIN GROUP (ORDER BY column)",
                ));
            };
            let column = column_name(&order.expr, view)?
                .ok_or_else(|| SqlError::at(&order.expr, "expected a column name"))?;
            Ok(Aggregate::Quantile {
                column,
                per_mille: p,
            })
        }
        other => Err(SqlError::at(
            function,
            format!(
                "`{other}` is not an aggregate renkei computes; use COUNT, SUM, AVG, MEDIAN or PERCENTILE_CONT"
            ),
        )),
    }
}

/// Compiles a WHERE condition on columns of `view`.
fn filter(expr: &Expr, view: &str) -> Result<Filter, SqlError> {
    match expr {
        Expr::Nested(inner) => filter(inner, view),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => Ok(Filter::And(vec![filter(left, view)?, filter(right, view)?])),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Or,
            right,
        } => Ok(Filter::Or(vec![filter(left, view)?, filter(right, view)?])),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr: inner,
        } => Ok(Filter::Not(Box::new(filter(inner, view)?))),
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::Ne,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::Le,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::Ge,
                other => {
                    return Err(SqlError::at(
                        expr,
                        format!("operator `{other}` is not supported"),
                    ));
                }
            };
            // Put the column on the left, flipping the operator if needed.
            match (column_name(left, view)?, column_name(right, view)?) {
                (Some(column), None) => Ok(Filter::cmp(column, op, literal(right)?)),
                (None, Some(column)) => Ok(Filter::cmp(column, flip(op), literal(left)?)),
                _ => Err(SqlError::at(
                    expr,
                    "expected a comparison between a column and a value",
                )),
            }
        }
        Expr::Between {
            expr: target,
            negated,
            low,
            high,
        } => {
            let column = column_name(target, view)?
                .ok_or_else(|| SqlError::at(target.as_ref(), "expected a column name"))?;
            let between = Filter::Between {
                column,
                low: literal(low)?,
                high: literal(high)?,
            };
            Ok(if *negated {
                Filter::Not(Box::new(between))
            } else {
                between
            })
        }
        Expr::In {
            expr: target,
            target: in_target,
            negated,
            global: false,
        } => {
            let column = column_name(target, view)?
                .ok_or_else(|| SqlError::at(target.as_ref(), "expected a column name"))?;
            let ast::InTarget::List(list) = in_target else {
                return Err(SqlError::at(
                    expr,
                    "IN takes a list of values, not a subquery",
                ));
            };
            let values = list.iter().map(literal).collect::<Result<Vec<_>, _>>()?;
            let within = Filter::In { column, values };
            Ok(if *negated {
                Filter::Not(Box::new(within))
            } else {
                within
            })
        }
        Expr::IsNull(target) | Expr::IsNotNull(target) => {
            let column = column_name(target, view)?
                .ok_or_else(|| SqlError::at(target.as_ref(), "expected a column name"))?;
            Ok(Filter::IsNull {
                column,
                negated: matches!(expr, Expr::IsNotNull(_)),
            })
        }
        Expr::IsTrue(target) | Expr::IsFalse(target) => {
            let column = column_name(target, view)?
                .ok_or_else(|| SqlError::at(target.as_ref(), "expected a column name"))?;
            Ok(Filter::eq(
                column,
                Literal::Bool(matches!(expr, Expr::IsTrue(_))),
            ))
        }
        _ => match column_name(expr, view)? {
            // A bare flag column: `diabetes` means `diabetes = TRUE`.
            Some(column) => Ok(Filter::eq(column, Literal::Bool(true))),
            None => Err(SqlError::at(
                expr,
                "expected a condition: a comparison, IN, BETWEEN, IS NULL, or a flag column",
            )),
        },
    }
}

/// The column an expression names, if it is a column: `age`; `timepoints.age` when the
/// query is on `timepoints` (the same); or a column of an enclosing layer, `patients.severity`
/// from the `timepoints` view or an item view, `timepoints.crp` from an item view. Any other
/// qualifier is an error, not silently the same column.
fn column_name(expr: &Expr, view: &str) -> Result<Option<String>, SqlError> {
    match expr {
        Expr::Identifier(ident) => Ok(Some(ident.value.to_ascii_lowercase())),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [qualifier, column] if qualifier.value.eq_ignore_ascii_case(view) => {
                Ok(Some(column.value.to_ascii_lowercase()))
            }
            [qualifier, column]
                if ["patients", "timepoints"]
                    .iter()
                    .any(|layer| qualifier.value.eq_ignore_ascii_case(layer)) =>
            {
                Ok(Some(format!(
                    "{}.{}",
                    qualifier.value.to_ascii_lowercase(),
                    column.value.to_ascii_lowercase()
                )))
            }
            _ => Err(SqlError::at(
                expr,
                format!(
                    "columns may be qualified by the view queried (`{view}.column`) or an enclosing layer (`patients.`, `timepoints.`)"
                ),
            )),
        },
        Expr::Nested(inner) => column_name(inner, view),
        _ => Ok(None),
    }
}

/// A literal: integer, exact decimal, 'text' or TRUE/FALSE.
fn literal(expr: &Expr) -> Result<Literal, SqlError> {
    match expr {
        Expr::Value(value) => match &value.value {
            Value::Number(text, _) => number(text).ok_or_else(|| {
                SqlError::at(
                    expr,
                    format!("`{text}` is not a number renkei can use exactly"),
                )
            }),
            Value::SingleQuotedString(text) => Ok(Literal::Text(text.clone())),
            Value::Boolean(flag) => Ok(Literal::Bool(*flag)),
            _ => Err(SqlError::at(
                expr,
                "expected a number, a 'quoted level' or TRUE/FALSE",
            )),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr: inner,
        } => match literal(inner)? {
            Literal::Integer(n) => n
                .checked_neg()
                .map(Literal::Integer)
                .ok_or_else(|| SqlError::at(expr, "number out of range")),
            Literal::Decimal(d) => Ok(Literal::Decimal(Decimal {
                digits: -d.digits,
                scale: d.scale,
            })),
            _ => Err(SqlError::at(expr, "only numbers can be negated")),
        },
        Expr::Nested(inner) => literal(inner),
        _ => Err(SqlError::at(expr, "expected a literal value here")),
    }
}

/// `12` as an integer, `1.50` as an exact decimal; exponents are refused.
fn number(text: &str) -> Option<Literal> {
    match text.split_once('.') {
        None => text.parse().ok().map(Literal::Integer),
        Some((whole, fraction)) => {
            if !whole
                .chars()
                .chain(fraction.chars())
                .all(|c| c.is_ascii_digit())
                || fraction.is_empty()
                || fraction.len() > 9
            {
                return None;
            }
            let digits: i64 = format!("{whole}{fraction}").parse().ok()?;
            Some(Literal::Decimal(Decimal {
                digits,
                scale: u8::try_from(fraction.len()).ok()?,
            }))
        }
    }
}

fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Ge => CmpOp::Le,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_conditions_to_the_canonical_ast() {
        let q = compile(
            "select count(*) from patients where age >= 65 and sex = 'female' and diabetes and not cancer and 80 > age",
        )
        .unwrap();
        assert_eq!(
            q.to_string(),
            "SELECT COUNT(*) FROM patients WHERE NOT cancer = TRUE AND age < 80 AND age >= 65 AND diabetes = TRUE AND sex = 'female'"
        );
        let same = compile(
            "SELECT COUNT(*) FROM patients WHERE (NOT cancer) AND sex = 'female' AND age >= 65 AND diabetes = true AND age < 80",
        )
        .unwrap();
        assert_eq!(q, same);
        let all = compile("SELECT COUNT(*) FROM patients").unwrap();
        assert_eq!(all.filter, Filter::True);
        assert_eq!(all.aggregate, Aggregate::CountPatients);
    }

    #[test]
    fn compiles_timepoint_queries_with_or_in_between_null_and_decimals() {
        let q = compile(
            "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE (crp > 1.5 OR il6 >= 100) AND care_level IN ('oxygen', 'ecmo') AND days_since_onset NOT BETWEEN 0 AND 3 AND ferritin IS NOT NULL",
        )
        .unwrap();
        assert_eq!(q.aggregate, Aggregate::CountPatients);
        assert_eq!(
            q.to_string(),
            "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE (crp > 1.5 OR il6 >= 100) AND NOT days_since_onset BETWEEN 0 AND 3 AND care_level IN ('ecmo', 'oxygen') AND ferritin IS NOT NULL"
        );
        let rows = compile("SELECT COUNT(*) FROM timepoints WHERE dexamethasone").unwrap();
        assert_eq!(rows.aggregate, Aggregate::CountRows);
        let negative =
            compile("SELECT COUNT(*) FROM timepoints WHERE days_since_admission > -2.5").unwrap();
        assert!(
            negative
                .to_string()
                .ends_with("days_since_admission > -2.5"),
            "{negative}"
        );
    }

    #[test]
    fn compiles_numeric_aggregates_and_groups() {
        let q = compile("SELECT AVG(crp) FROM timepoints WHERE dexamethasone").unwrap();
        assert_eq!(
            q.aggregate,
            Aggregate::Mean {
                column: "crp".into()
            }
        );
        let q = compile("SELECT MEDIAN(age) FROM patients").unwrap();
        assert_eq!(
            q.aggregate,
            Aggregate::Quantile {
                column: "age".into(),
                per_mille: 500
            }
        );
        let q = compile("SELECT PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY il6) FROM timepoints")
            .unwrap();
        assert_eq!(
            q.aggregate,
            Aggregate::Quantile {
                column: "il6".into(),
                per_mille: 900
            }
        );
        assert_eq!(
            q.to_string(),
            "SELECT PERCENTILE_CONT(0.900) WITHIN GROUP (ORDER BY il6) FROM timepoints"
        );
        let q = compile("SELECT SUM(ldh) FROM timepoints").unwrap();
        assert_eq!(
            q.aggregate,
            Aggregate::Sum {
                column: "ldh".into()
            }
        );
        let q = compile(
            "SELECT sex, severity, COUNT(*) FROM patients WHERE age >= 65 GROUP BY sex, severity",
        )
        .unwrap();
        assert_eq!(q.group_by, vec!["sex", "severity"]);
        assert_eq!(q.aggregation_name(), "histogram");
        // GROUP BY takes SUM and AVG per cell too; a study must allow grouping and the sum.
        let q = compile("SELECT severity, AVG(age) FROM patients GROUP BY severity").unwrap();
        assert_eq!(q.group_by, vec!["severity"]);
        assert_eq!(
            q.aggregate,
            Aggregate::Mean {
                column: "age".into()
            }
        );
        assert_eq!(q.required_aggregations(), vec!["histogram", "mean"]);
        assert_eq!(
            q.to_string(),
            "SELECT severity, AVG(age) FROM patients GROUP BY severity"
        );
        for bad in [
            "SELECT sex, COUNT(*) FROM patients",
            "SELECT COUNT(*) FROM patients GROUP BY sex, severity, outcome",
            "SELECT sex, MEDIAN(age) FROM patients GROUP BY sex",
            "SELECT PERCENTILE_CONT(1.5) WITHIN GROUP (ORDER BY age) FROM patients",
            "SELECT STDDEV(age) FROM patients",
        ] {
            assert!(compile(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn errors_point_at_the_offending_sql() {
        let sql = "SELECT COUNT(*) FROM patients\nWHERE age > 3 OR sex LIKE 'm%'";
        let err = compile(sql).unwrap_err();
        assert_eq!((err.line, err.column), (2, 18), "{err}");
        assert!(err.render(sql).contains("^"), "{}", err.render(sql));

        let err = compile("SELECT COUNT(*) FROM patients WHERE").unwrap_err();
        assert_eq!((err.line, err.column), (1, 36), "{err:?}");
        let err = compile("SELECT COUNT(*) FORM patients").unwrap_err();
        assert_eq!((err.line, err.column), (1, 22), "{err:?}");
        let err = compile("SELECT MODE(age) FROM patients").unwrap_err();
        assert!(err.message.contains("COUNT, SUM, AVG"), "{err}");
        let err = compile("DELETE FROM patients").unwrap_err();
        assert!(err.message.contains("SELECT"), "{err}");
        let err = compile("SELECT COUNT(*) FROM patients WHERE age > 1e3").unwrap_err();
        assert!(err.message.contains("exactly"), "{err}");
        for ignored in [
            "SELECT COUNT(*) FILTER (WHERE diabetes) FROM patients",
            "SELECT COUNT(*) OVER () FROM patients",
            "SELECT COUNT(*) FROM patients ORDER BY 1",
            "SELECT COUNT(*) FROM patients LIMIT 1",
            "SELECT TOP 5 COUNT(*) FROM patients",
            "SELECT COUNT(*) FROM patients p",
            "SELECT COUNT(*) FROM patients WHERE visits.age > 3",
            "SELECT COUNT(DISTINCT age) FROM patients",
            "SELECT SUM(DISTINCT age) FROM patients",
        ] {
            assert!(compile(ignored).is_err(), "{ignored} was accepted");
        }
        assert!(compile("SELECT COUNT(*) FROM patients WHERE patients.age > 3").is_ok());
    }
}
