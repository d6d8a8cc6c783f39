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
use renkei_protocol::{
    Aggregate, CmpOp, Covariate, Decimal, DerivedColumn, Filter, FitStep, Literal, PerPatient,
    Query, Summary,
};
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

    fn at_name(ident: &ast::Ident, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            line: ident.span.start.line,
            column: ident.span.start.column,
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
    let per_patient = match &query.with {
        None => None,
        Some(with) => Some(with_table(with)?),
    };
    let select = plain_select(query)?;
    let view = view_name(select)?;
    if let Some(table) = &per_patient
        && table.name != view
    {
        return Err(SqlError::at(
            select,
            format!(
                "WITH defines `{}`; the query must range over it (FROM {})",
                table.name, table.name
            ),
        ));
    }
    let per_patient_view = per_patient.is_some();
    let group_by = group_columns(select, &view)?;
    let aggregate = projection(select, &view, &group_by, per_patient_view)?;
    let filter = match &select.selection {
        Some(condition) => filter(condition, &view)?,
        None => Filter::True,
    };
    let query = Query {
        view,
        aggregate,
        filter,
        group_by,
        per_patient,
    }
    .canonical();
    query.check_shape()?;
    Ok(query)
}

/// The one SELECT of a query (the outer one or a WITH's), every clause renkei does not
/// understand refused: ignoring one would answer (and charge for) a different question than
/// the one written.
fn plain_select(query: &ast::Query) -> Result<&ast::Select, SqlError> {
    if query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
        || !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return Err(SqlError::at(
            query,
            "only [WITH …] SELECT … FROM … WHERE … is supported (no ORDER BY, LIMIT, FETCH, FOR or pipes)",
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
    Ok(select)
}

/// The GROUP BY column names.
fn group_columns(select: &ast::Select, view: &str) -> Result<Vec<String>, SqlError> {
    match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs
            .iter()
            .map(|e| {
                column_name(e, view)?.ok_or_else(|| SqlError::at(e, "GROUP BY takes column names"))
            })
            .collect(),
        GroupByExpr::Expressions(..) | GroupByExpr::All(_) => Err(SqlError::at(
            select,
            "GROUP BY ALL and ROLLUP/CUBE are not supported",
        )),
    }
}

/// A `WITH p AS (SELECT patient_id, <summary> [FILTER (WHERE …)] AS name, … FROM
/// timepoints [WHERE …] GROUP BY patient_id)`: a per-patient table.
fn with_table(with: &ast::With) -> Result<PerPatient, SqlError> {
    let [cte] = with.cte_tables.as_slice() else {
        return Err(SqlError::at(
            with,
            "WITH defines exactly one per-patient table",
        ));
    };
    if with.recursive || cte.from.is_some() || cte.materialized.is_some() {
        return Err(SqlError::at(
            with,
            "WITH RECURSIVE and MATERIALIZED are not supported",
        ));
    }
    if !cte.alias.columns.is_empty() {
        return Err(SqlError::at_name(
            &cte.alias.name,
            "name the derived columns with AS inside the WITH, not after its name",
        ));
    }
    let name = cte.alias.name.value.to_ascii_lowercase();
    if matches!(name.as_str(), "patients" | "timepoints") {
        return Err(SqlError::at_name(
            &cte.alias.name,
            format!("`{name}` is a view; give the WITH table another name, e.g. p"),
        ));
    }
    if cte.query.with.is_some() {
        return Err(SqlError::at(
            cte.query.as_ref(),
            "a WITH inside a WITH is not supported",
        ));
    }
    let select = plain_select(&cte.query)?;
    let source = view_name(select)?;
    let group_by = group_columns(select, &source)?;
    if !group_by.iter().any(|c| c == "patient_id") {
        return Err(SqlError::at(
            select,
            "a WITH table has one row per patient: it must GROUP BY patient_id",
        ));
    }
    let patient_columns: Vec<String> = group_by
        .iter()
        .filter(|c| *c != "patient_id")
        .cloned()
        .collect();
    let mut columns = Vec::new();
    let mut listed = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::ExprWithAlias { expr, alias } => {
                let Expr::Function(function) = expr else {
                    return Err(SqlError::at(
                        expr,
                        "expected a per-patient summary such as MIN(col), MAX(col), COUNT(*), BOOL_OR(cond) or ARG_MIN(col, day)",
                    ));
                };
                columns.push(DerivedColumn {
                    name: alias.value.to_ascii_lowercase(),
                    summary: summary(function, &source)?,
                    filter: match &function.filter {
                        Some(condition) => filter(condition, &source)?,
                        None => Filter::True,
                    },
                });
            }
            SelectItem::UnnamedExpr(Expr::Function(function)) => {
                return Err(SqlError::at(
                    function,
                    "name each derived column: MIN(…) AS first_day",
                ));
            }
            SelectItem::UnnamedExpr(expr) => match column_name(expr, &source)? {
                Some(column) => listed.push((column, expr)),
                None => return Err(SqlError::at(expr, "expected a column or a named summary")),
            },
            other => {
                return Err(SqlError::at(
                    other,
                    "expected patient_id, patient columns and named summaries",
                ));
            }
        }
    }
    if !listed.iter().any(|(c, _)| c == "patient_id") {
        return Err(SqlError::at(select, "a WITH table selects patient_id"));
    }
    if let Some((column, expr)) = listed.iter().find(|(c, _)| !group_by.contains(c)) {
        return Err(SqlError::at(
            *expr,
            format!(
                "`{column}` is selected but not in GROUP BY; a WITH table's plain columns are the patient's own"
            ),
        ));
    }
    let rows = match &select.selection {
        Some(condition) => filter(condition, &source)?,
        None => Filter::True,
    };
    Ok(PerPatient {
        name,
        source,
        filter: rows,
        columns,
        patient_columns,
    })
}

/// A function call's lowercased name and its argument list.
fn call<'f>(
    function: &'f ast::Function,
    what: &str,
) -> Result<(String, &'f ast::FunctionArgumentList), SqlError> {
    let name = match function.name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => ident.value.to_ascii_lowercase(),
        _ => return Err(SqlError::at(function, format!("unknown {what}"))),
    };
    let FunctionArguments::List(list) = &function.args else {
        return Err(SqlError::at(function, format!("{name} needs arguments")));
    };
    Ok((name, list))
}

/// A per-patient summary in a WITH: `MIN`, `MAX`, `COUNT`, `BOOL_OR`, `BOOL_AND`,
/// `ARG_MIN` / `ARG_MAX` (DuckDB's names; `MIN_BY` / `MAX_BY` too).
fn summary(function: &ast::Function, view: &str) -> Result<Summary, SqlError> {
    let (name, list) = call(function, "summary")?;
    if !list.clauses.is_empty()
        || function.over.is_some()
        || function.null_treatment.is_some()
        || function.uses_odbc_syntax
        || !matches!(function.parameters, FunctionArguments::None)
        || !function.within_group.is_empty()
        || list.duplicate_treatment.is_some()
    {
        return Err(SqlError::at(
            function,
            "a per-patient summary takes its arguments and an optional FILTER (WHERE …), nothing else",
        ));
    }
    if name == "count"
        && matches!(
            list.args.as_slice(),
            [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]
        )
    {
        return Ok(Summary::Count { column: None });
    }
    let args: Vec<&Expr> = list
        .args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Ok(expr),
            other => Err(SqlError::at(
                function,
                format!("unexpected argument `{other}`"),
            )),
        })
        .collect::<Result<_, _>>()?;
    let column = |expr: &Expr| {
        column_name(expr, view)?.ok_or_else(|| SqlError::at(expr, "expected a column name"))
    };
    let arity = |n: usize, form: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(SqlError::at(function, format!("expected {form}")))
        }
    };
    match name.as_str() {
        "min" => {
            arity(1, "MIN(column)")?;
            Ok(Summary::Min {
                column: column(args[0])?,
            })
        }
        "max" => {
            arity(1, "MAX(column)")?;
            Ok(Summary::Max {
                column: column(args[0])?,
            })
        }
        "count" => match args.as_slice() {
            [expr] => Ok(Summary::Count {
                column: Some(column(expr)?),
            }),
            _ => Err(SqlError::at(function, "expected COUNT(*) or COUNT(column)")),
        },
        "bool_or" => {
            arity(1, "BOOL_OR(condition)")?;
            Ok(Summary::Any {
                condition: filter(args[0], view)?,
            })
        }
        "bool_and" => {
            arity(1, "BOOL_AND(condition)")?;
            Ok(Summary::Every {
                condition: filter(args[0], view)?,
            })
        }
        "arg_min" | "min_by" => {
            arity(2, "ARG_MIN(value, by)")?;
            Ok(Summary::ValueAtMin {
                value: column(args[0])?,
                by: column(args[1])?,
            })
        }
        "arg_max" | "max_by" => {
            arity(2, "ARG_MAX(value, by)")?;
            Ok(Summary::ValueAtMax {
                value: column(args[0])?,
                by: column(args[1])?,
            })
        }
        other => Err(SqlError::at(
            function,
            format!(
                "`{other}` is not a per-patient summary renkei derives; use MIN, MAX, COUNT, BOOL_OR, BOOL_AND, ARG_MIN or ARG_MAX"
            ),
        )),
    }
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
    per_patient: bool,
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
                aggregate = Some(function_aggregate(function, view, per_patient)?);
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
        | Aggregate::Mean { .. }
        | Aggregate::KaplanMeier { .. } => true,
        Aggregate::Quantile { .. }
        | Aggregate::LinearRegression { .. }
        | Aggregate::LogisticRegression { .. } => false,
    };
    if !group_by.is_empty() && !groupable {
        return Err(SqlError::at(
            select,
            "GROUP BY works with COUNT, SUM, AVG and KAPLAN_MEIER; a quantile or regression per group is not offered yet (put the group in the model as a covariate, or in WHERE)",
        ));
    }
    Ok(aggregate)
}

/// The aggregate a function call in the SELECT list asks for.
fn function_aggregate(
    function: &ast::Function,
    view: &str,
    per_patient: bool,
) -> Result<Aggregate, SqlError> {
    let (name, list) = call(function, "aggregate")?;
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
                Ok(if view == "patients" || per_patient {
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
                    Literal::Integer(_) | Literal::Text(_) | Literal::Bool(_) => None,
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
        "kaplan_meier" => survival(function, &list.args, view),
        "linear_regression" => regression(function, &list.args, view, false),
        "logistic_regression" => regression(function, &list.args, view, true),
        other => Err(SqlError::at(
            function,
            format!(
                "`{other}` is not an aggregate renkei computes; use COUNT, SUM, AVG, MEDIAN, PERCENTILE_CONT, KAPLAN_MEIER, LINEAR_REGRESSION or LOGISTIC_REGRESSION"
            ),
        )),
    }
}

/// Newton steps of a logistic fit when `LOGISTIC_REGRESSION` names none.
pub const DEFAULT_FIT_ITERATIONS: u8 = 10;

/// `LINEAR_REGRESSION(outcome, covariate, …)` (the outcome a numeric column) and
/// `LOGISTIC_REGRESSION(outcome, covariate, … [, iterations => n])` (the outcome a
/// condition): each covariate a numeric or true/false column, or a condition read as 1 or
/// 0 (`sex = 'male'`).
fn regression(
    function: &ast::Function,
    args: &[FunctionArg],
    view: &str,
    logistic: bool,
) -> Result<Aggregate, SqlError> {
    let usage = if logistic {
        "expected LOGISTIC_REGRESSION(outcome condition, covariate, … [, iterations => n]), e.g. \
         LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), age, sex = 'male', diabetes)"
    } else {
        "expected LINEAR_REGRESSION(outcome column, covariate, …), e.g. \
         LINEAR_REGRESSION(crp, age, sex = 'male', diabetes)"
    };
    let mut exprs = Vec::with_capacity(args.len());
    let mut iterations = None;
    for arg in args {
        match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) if iterations.is_none() => {
                exprs.push(expr)
            }
            FunctionArg::Named {
                name,
                arg: FunctionArgExpr::Expr(expr),
                ..
            } if logistic && name.value.eq_ignore_ascii_case("iterations") => {
                let max = renkei_protocol::query::MAX_FIT_ITERATIONS;
                let steps = match literal(expr)? {
                    Literal::Integer(n) => u8::try_from(n).ok().filter(|n| (1..=max).contains(n)),
                    Literal::Decimal(_) | Literal::Text(_) | Literal::Bool(_) => None,
                };
                iterations = Some(steps.ok_or_else(|| {
                    SqlError::at(
                        expr,
                        format!("iterations is a whole number of Newton steps from 1 to {max}"),
                    )
                })?);
            }
            _ => return Err(SqlError::at(function, usage)),
        }
    }
    let [outcome, covariates @ ..] = exprs.as_slice() else {
        return Err(SqlError::at(function, usage));
    };
    let max = renkei_protocol::query::MAX_COVARIATES;
    if covariates.is_empty() || covariates.len() > max {
        return Err(SqlError::at(
            function,
            format!("a regression takes 1 to {max} covariates after its outcome; {usage}"),
        ));
    }
    let covariates = covariates
        .iter()
        .map(|expr| match column_name(expr, view)? {
            Some(column) => Ok(Covariate::Column(column)),
            None => Ok(Covariate::Indicator(filter(expr, view)?)),
        })
        .collect::<Result<Vec<_>, SqlError>>()?;
    if logistic {
        Ok(Aggregate::LogisticRegression {
            // A bare true/false column is the condition that it is true.
            outcome: match column_name(outcome, view)? {
                Some(column) => Filter::eq(column, Literal::Bool(true)),
                None => filter(outcome, view)?,
            },
            covariates,
            iterations: iterations.unwrap_or(DEFAULT_FIT_ITERATIONS),
            step: FitStep::default(),
        })
    } else {
        let outcome = column_name(outcome, view)?
            .ok_or_else(|| SqlError::at(*outcome, "a linear fit's outcome is a numeric column"))?;
        Ok(Aggregate::LinearRegression {
            outcome,
            covariates,
        })
    }
}

/// The survival horizon when `KAPLAN_MEIER` names none, in days.
pub const DEFAULT_SURVIVAL_HORIZON: u16 = 90;

/// `KAPLAN_MEIER(time, event [, horizon_days])`: `time` a day column or `COALESCE` of
/// several, `event` a condition on the row.
fn survival(
    function: &ast::Function,
    args: &[FunctionArg],
    view: &str,
) -> Result<Aggregate, SqlError> {
    let usage = "expected KAPLAN_MEIER(time, event [, horizon_days]), e.g. \
                 KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 90)";
    let exprs: Vec<&Expr> = args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Ok(expr),
            _ => Err(SqlError::at(function, usage)),
        })
        .collect::<Result<_, _>>()?;
    let (time, event, horizon) = match exprs.as_slice() {
        [time, event] => (*time, *event, None),
        [time, event, horizon] => (*time, *event, Some(*horizon)),
        _ => return Err(SqlError::at(function, usage)),
    };
    let times = match time {
        Expr::Function(coalesce)
            if matches!(coalesce.name.0.as_slice(),
                [ObjectNamePart::Identifier(name)] if name.value.eq_ignore_ascii_case("coalesce")) =>
        {
            let (_, list) = call(coalesce, "COALESCE")?;
            list.args
                .iter()
                .map(|arg| match arg {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => column_name(expr, view)?
                        .ok_or_else(|| SqlError::at(expr, "COALESCE takes day columns")),
                    _ => Err(SqlError::at(coalesce, "COALESCE takes day columns")),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        other => vec![column_name(other, view)?.ok_or_else(|| {
            SqlError::at(
                other,
                "a survival time is a day column or COALESCE(day columns)",
            )
        })?],
    };
    let horizon_days = match horizon {
        None => DEFAULT_SURVIVAL_HORIZON,
        Some(expr) => match literal(expr)? {
            Literal::Integer(days) => u16::try_from(days)
                .ok()
                .filter(|d| (1..=renkei_protocol::query::MAX_SURVIVAL_DAYS).contains(d))
                .ok_or_else(|| {
                    SqlError::at(
                        expr,
                        format!(
                            "the horizon is a whole number of days from 1 to {}",
                            renkei_protocol::query::MAX_SURVIVAL_DAYS
                        ),
                    )
                })?,
            _ => {
                return Err(SqlError::at(expr, "the horizon is a whole number of days"));
            }
        },
    };
    Ok(Aggregate::KaplanMeier {
        time: times,
        event: filter(event, view)?,
        horizon_days,
    })
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
            comparison(left, op, right, expr, view)
        }
        Expr::Between {
            expr: target,
            negated,
            low,
            high,
        } => {
            let between = match (literal(low), literal(high)) {
                (Ok(low), Ok(high)) => Filter::Between {
                    column: column_name(target, view)?
                        .ok_or_else(|| SqlError::at(target.as_ref(), "expected a column name"))?,
                    low,
                    high,
                },
                // Bounds that are columns: `icu_day BETWEEN toci_day AND toci_day + 3`.
                _ => Filter::And(vec![
                    comparison(target, CmpOp::Ge, low, expr, view)?,
                    comparison(target, CmpOp::Le, high, expr, view)?,
                ]),
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

/// `left op right`: a column and a value (the column put on the left), or two columns and
/// a constant (`icu_day > toci_day + 3`, `icu_day - toci_day <= 3`).
fn comparison(
    left: &Expr,
    op: CmpOp,
    right: &Expr,
    whole: &Expr,
    view: &str,
) -> Result<Filter, SqlError> {
    match (column_name(left, view)?, column_name(right, view)?) {
        (Some(column), None) if matches!(right, Expr::Value(_)) || literal(right).is_ok() => {
            return Ok(Filter::cmp(column, op, literal(right)?));
        }
        (None, Some(column)) if matches!(left, Expr::Value(_)) || literal(left).is_ok() => {
            return Ok(Filter::cmp(column, op.flipped(), literal(left)?));
        }
        _ => {}
    }
    let expected = || {
        SqlError::at(
            whole,
            "expected a comparison between a column and a value, or between two columns (`icu_day > toci_day + 3`)",
        )
    };
    let (Some(l), Some(r)) = (linear(left, view)?, linear(right, view)?) else {
        return Err(expected());
    };
    // left - right op 0, with like columns cancelled.
    let difference = l.minus(r).ok_or_else(expected)?;
    let mut positive = Vec::new();
    let mut negative = Vec::new();
    for (column, weight) in &difference.columns {
        match weight {
            1 => positive.push(column.clone()),
            -1 => negative.push(column.clone()),
            0 => {}
            _ => return Err(expected()),
        }
    }
    let constant = |negate: bool| {
        let digits = if negate {
            -difference.constant.0
        } else {
            difference.constant.0
        };
        let digits =
            i64::try_from(digits).map_err(|_| SqlError::at(whole, "number out of range"))?;
        Ok::<_, SqlError>(match difference.constant.1 {
            0 => Literal::Integer(digits),
            scale => Literal::Decimal(Decimal { digits, scale }),
        })
    };
    match (positive.as_slice(), negative.as_slice()) {
        // a - b + c op 0  ⇔  a op b - c
        ([a], [b]) => Ok(Filter::Columns {
            left: a.clone(),
            op,
            right: b.clone(),
            offset: constant(true)?,
        }),
        ([a], []) => Ok(Filter::cmp(a.clone(), op, constant(true)?)),
        ([], [b]) => Ok(Filter::cmp(b.clone(), op.flipped(), constant(false)?)),
        _ => Err(expected()),
    }
}

/// A sum of columns with weights and a constant (digits, scale): `a`, `a + 3`, `a - b`.
#[derive(Debug)]
struct Linear {
    columns: Vec<(String, i64)>,
    constant: (i128, u8),
}

impl Linear {
    fn minus(self, other: Linear) -> Option<Linear> {
        self.plus(other.negated())
    }

    fn negated(mut self) -> Linear {
        self.columns.iter_mut().for_each(|(_, w)| *w = -*w);
        self.constant.0 = -self.constant.0;
        self
    }

    fn plus(mut self, other: Linear) -> Option<Linear> {
        for (column, weight) in other.columns {
            match self.columns.iter_mut().find(|(c, _)| *c == column) {
                Some((_, w)) => *w += weight,
                None => self.columns.push((column, weight)),
            }
        }
        let scale = self.constant.1.max(other.constant.1);
        let at = |(digits, from): (i128, u8)| {
            10i128
                .checked_pow(u32::from(scale - from))
                .and_then(|f| digits.checked_mul(f))
        };
        self.constant = (at(self.constant)?.checked_add(at(other.constant)?)?, scale);
        Some(self)
    }
}

/// The linear form of an expression of columns, numbers, `+`, `-` and parentheses.
fn linear(expr: &Expr, view: &str) -> Result<Option<Linear>, SqlError> {
    if let Some(column) = column_name(expr, view)? {
        return Ok(Some(Linear {
            columns: vec![(column, 1)],
            constant: (0, 0),
        }));
    }
    Ok(match expr {
        Expr::Nested(inner) => linear(inner, view)?,
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr: inner,
        } => linear(inner, view)?.map(Linear::negated),
        Expr::BinaryOp {
            left,
            op: op @ (BinaryOperator::Plus | BinaryOperator::Minus),
            right,
        } => match (linear(left, view)?, linear(right, view)?) {
            (Some(l), Some(r)) if *op == BinaryOperator::Plus => l.plus(r),
            (Some(l), Some(r)) => l.minus(r),
            _ => None,
        },
        Expr::Value(_) => match literal(expr) {
            Ok(Literal::Integer(n)) => Some(Linear {
                columns: vec![],
                constant: (i128::from(n), 0),
            }),
            Ok(Literal::Decimal(d)) => Some(Linear {
                columns: vec![],
                constant: (i128::from(d.digits), d.scale),
            }),
            Ok(Literal::Text(_) | Literal::Bool(_)) | Err(_) => None,
        },
        _ => None,
    })
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

    const TEMPORAL: &str = "WITH p AS (
      SELECT patient_id,
             MIN(days_since_admission) FILTER (WHERE tocilizumab) AS toci_day,
             MIN(days_since_admission) FILTER (WHERE care_level IN ('icu_ventilation', 'ecmo')) AS icu_day,
             MAX(crp) AS max_crp,
             BOOL_OR(dexamethasone) AS dexa,
             ARG_MIN(crp, days_since_onset) AS first_crp,
             COUNT(*) AS visits
      FROM timepoints GROUP BY patient_id)
    SELECT COUNT(*) FROM p WHERE toci_day <= 3 AND icu_day > toci_day";

    #[test]
    fn compiles_a_with_table_of_per_patient_summaries() {
        let q = compile(TEMPORAL).unwrap();
        assert_eq!(q.aggregate, Aggregate::CountPatients);
        assert_eq!(q.view, "p");
        assert_eq!(q.source_view(), "timepoints");
        let table = q.per_patient.as_ref().unwrap();
        assert_eq!(table.source, "timepoints");
        let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "dexa",
                "first_crp",
                "icu_day",
                "max_crp",
                "toci_day",
                "visits"
            ],
            "sorted: the canonical form"
        );
        assert_eq!(
            table.derived("first_crp").unwrap().summary,
            Summary::ValueAtMin {
                value: "crp".into(),
                by: "days_since_onset".into()
            }
        );
        assert_eq!(
            table.derived("toci_day").unwrap().filter,
            Filter::eq("tocilizumab", Literal::Bool(true))
        );
        assert!(q.filter.columns().contains("icu_day"));
        // Policies see the stored columns the derivation reads, not its names.
        let columns: Vec<&str> = q.columns().into_iter().collect();
        assert_eq!(
            columns,
            vec![
                "care_level",
                "crp",
                "days_since_admission",
                "days_since_onset",
                "dexamethasone",
                "tocilizumab"
            ]
        );
        // The printed form compiles back to the same query.
        let again = compile(&q.to_string()).unwrap();
        assert_eq!(again, q, "{q}");
    }

    #[test]
    fn compiles_comparisons_between_columns() {
        let with = |condition: &str| {
            compile(&format!(
                "WITH p AS (SELECT patient_id, MIN(days_since_admission) FILTER (WHERE tocilizumab) AS a, MIN(days_since_admission) FILTER (WHERE care_level = 'ecmo') AS b FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p WHERE {condition}"
            ))
            .map(|q| q.filter)
        };
        // Canonical: the columns in name order.
        let within = Filter::Columns {
            left: "a".into(),
            op: CmpOp::Ge,
            right: "b".into(),
            offset: Literal::Integer(-3),
        };
        assert_eq!(with("b <= a + 3").unwrap(), within);
        assert_eq!(with("b - a <= 3").unwrap(), within);
        assert_eq!(with("a + 3 >= b").unwrap(), within);
        assert_eq!(with("b - 3 <= a").unwrap(), within);
        assert_eq!(
            with("b BETWEEN a AND a + 3").unwrap(),
            with("b >= a AND b <= a + 3").unwrap()
        );
        assert_eq!(
            with("NOT b BETWEEN a AND a + 3").unwrap(),
            with("NOT (b >= a AND a + 3 >= b)").unwrap()
        );
        // Arithmetic with one column is a plain comparison.
        assert_eq!(
            with("a + 2 > 5").unwrap(),
            Filter::cmp("a", CmpOp::Gt, Literal::Integer(3))
        );
        assert_eq!(
            with("b - a > 1.5").unwrap(),
            Filter::Columns {
                left: "a".into(),
                op: CmpOp::Lt,
                right: "b".into(),
                offset: Literal::Decimal(Decimal {
                    digits: -15,
                    scale: 1
                }),
            }
        );
        for bad in ["a + b > 3", "2 * a > b", "a - a > 0", "a > b + c"] {
            assert!(with(bad).is_err(), "{bad} was accepted");
        }
        // On stored views too.
        let q = compile(
            "SELECT COUNT(*) FROM timepoints WHERE days_since_onset > days_since_admission + 7",
        )
        .unwrap();
        assert!(
            q.to_string()
                .ends_with("days_since_admission < days_since_onset - 7"),
            "{q}"
        );
    }

    #[test]
    fn a_with_table_that_is_not_per_patient_is_refused_where_it_goes_wrong() {
        for (bad, says) in [
            (
                "WITH p AS (SELECT patient_id, MAX(crp) AS m FROM timepoints) SELECT COUNT(*) FROM p",
                "GROUP BY patient_id",
            ),
            (
                "WITH p AS (SELECT MAX(crp) AS m FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p",
                "selects patient_id",
            ),
            (
                "WITH p AS (SELECT patient_id, MAX(crp) FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p",
                "name each derived column",
            ),
            (
                "WITH p AS (SELECT patient_id, STDDEV(crp) AS s FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p",
                "not a per-patient summary",
            ),
            (
                "WITH p AS (SELECT patient_id, MAX(crp) AS m FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM patients",
                "must range over it",
            ),
            (
                "WITH p AS (SELECT patient_id, age, MAX(crp) AS m FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p",
                "not in GROUP BY",
            ),
            (
                "WITH p AS (SELECT patient_id, MAX(crp) AS m FROM timepoints GROUP BY patient_id), q AS (SELECT patient_id, MAX(crp) AS m FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p",
                "exactly one",
            ),
            (
                "WITH p AS (SELECT patient_id, MAX(crp) AS m, MIN(crp) AS m FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p",
                "twice",
            ),
        ] {
            let err = compile(bad).unwrap_err();
            assert!(err.message.contains(says), "{bad}: {err}");
        }
        let sql = "WITH p AS (SELECT patient_id,\n  MODE(crp) AS m FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p";
        let err = compile(sql).unwrap_err();
        assert_eq!((err.line, err.column), (2, 3), "{err}");
    }
    #[test]
    fn compiles_survival_curves_and_prints_them_back() {
        let q = compile(
            "SELECT dexa, KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 60) FROM patients GROUP BY dexa",
        )
        .unwrap();
        assert_eq!(
            q.aggregate,
            Aggregate::KaplanMeier {
                time: vec!["death_day".into(), "followup_day".into()],
                event: Filter::IsNull {
                    column: "death_day".into(),
                    negated: true,
                },
                horizon_days: 60,
            }
        );
        assert_eq!(q.group_by, vec!["dexa".to_string()]);
        assert_eq!(q.aggregation_name(), "kaplan_meier");
        assert!(q.columns().contains("followup_day"));
        // What Display prints compiles to the same query.
        assert_eq!(compile(&q.to_string()).unwrap(), q, "{q}");
        // One time column and the default horizon.
        let q =
            compile("SELECT KAPLAN_MEIER(followup_day, outcome = 'died') FROM patients").unwrap();
        assert!(
            matches!(q.aggregate, Aggregate::KaplanMeier { horizon_days: DEFAULT_SURVIVAL_HORIZON, ref time, .. } if time == &["followup_day".to_string()])
        );
        assert_eq!(compile(&q.to_string()).unwrap(), q, "{q}");
    }

    #[test]
    fn a_survival_curve_that_does_not_fit_is_refused_where_it_goes_wrong() {
        for (bad, says, column) in [
            (
                "SELECT KAPLAN_MEIER(followup_day) FROM patients",
                "expected KAPLAN_MEIER(time, event",
                8,
            ),
            (
                "SELECT KAPLAN_MEIER(followup_day, death_day IS NOT NULL, 0) FROM patients",
                "from 1 to 730",
                58,
            ),
            (
                "SELECT KAPLAN_MEIER(followup_day, death_day IS NOT NULL, 9000) FROM patients",
                "from 1 to 730",
                58,
            ),
            (
                "SELECT KAPLAN_MEIER(followup_day + 1, death_day IS NOT NULL) FROM patients",
                "day column or COALESCE",
                21,
            ),
            (
                "SELECT KAPLAN_MEIER(COALESCE(death_day, 3), death_day IS NOT NULL) FROM patients",
                "COALESCE takes day columns",
                41,
            ),
        ] {
            let err = compile(bad).unwrap_err();
            assert!(err.message.contains(says), "{bad}: {err}");
            assert_eq!(err.column, column, "{bad}: {err}");
        }
    }

    #[test]
    fn compiles_regressions_and_prints_them_back() {
        let q = compile(
            "SELECT LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), age, sex = 'male', \
             diabetes, iterations => 6) FROM patients WHERE age >= 18",
        )
        .unwrap();
        let Aggregate::LogisticRegression {
            outcome,
            covariates,
            iterations,
            step,
        } = &q.aggregate
        else {
            panic!("{q:?}");
        };
        assert!(matches!(outcome, Filter::In { column, .. } if column == "severity"));
        assert_eq!(
            covariates,
            &vec![
                Covariate::Column("age".into()),
                Covariate::Indicator(Filter::eq("sex", Literal::Text("male".into()))),
                Covariate::Column("diabetes".into()),
            ]
        );
        assert_eq!((*iterations, step), (6, &FitStep::default()));
        assert_eq!(q.aggregation_name(), "logistic_regression");
        assert_eq!(compile(&q.to_string()).unwrap(), q, "{q}");
        // A bare flag is its being true; the steps default.
        let q = compile("SELECT LOGISTIC_REGRESSION(diabetes, age) FROM patients").unwrap();
        assert!(matches!(
            q.aggregate,
            Aggregate::LogisticRegression { ref outcome, iterations: DEFAULT_FIT_ITERATIONS, .. }
                if *outcome == Filter::eq("diabetes", Literal::Bool(true))
        ));
        let q =
            compile("SELECT LINEAR_REGRESSION(crp, age, dexamethasone) FROM timepoints").unwrap();
        assert_eq!(q.aggregation_name(), "linear_regression");
        assert_eq!(compile(&q.to_string()).unwrap(), q, "{q}");
    }

    #[test]
    fn a_regression_that_does_not_fit_is_refused_where_it_goes_wrong() {
        for (bad, says, column) in [
            (
                "SELECT LINEAR_REGRESSION(crp) FROM timepoints",
                "1 to 16 covariates",
                8,
            ),
            (
                "SELECT LINEAR_REGRESSION(crp > 3, age) FROM timepoints",
                "a linear fit's outcome is a numeric column",
                26,
            ),
            (
                "SELECT LOGISTIC_REGRESSION(diabetes, age, iterations => 0) FROM patients",
                "from 1 to 25",
                57,
            ),
            (
                "SELECT LINEAR_REGRESSION(crp, age, iterations => 3) FROM timepoints",
                "expected LINEAR_REGRESSION",
                8,
            ),
            (
                "SELECT sex, LOGISTIC_REGRESSION(diabetes, age) FROM patients GROUP BY sex",
                "regression per group is not offered",
                1,
            ),
        ] {
            let err = compile(bad).unwrap_err();
            assert!(err.message.contains(says), "{bad}: {err}");
            assert_eq!(err.column, column, "{bad}: {err}");
        }
    }
}
