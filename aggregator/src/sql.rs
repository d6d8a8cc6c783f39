//! Researchers' SQL, compiled to the signed query AST.
//!
//! Accepted for now: `SELECT COUNT(*) FROM patients [WHERE …]` where the condition is an AND
//! of comparisons: `column = 'level'`, `column = true|false`, a bare flag (`diabetes`) or its
//! negation (`NOT diabetes`), `column <op> integer` with `=, <, <=, >, >=` (either side), and
//! `column BETWEEN a AND b`. Anything else is an error that points at the offending part of
//! the SQL (line and column). Column names and levels are checked by each node against its
//! schema.

use std::fmt;

use renkei_protocol::query::QueryShapeError;
use renkei_protocol::{Category, Predicate, Query};
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
    if !matches!(&select.group_by, GroupByExpr::Expressions(exprs, _) if exprs.is_empty()) {
        return Err(SqlError::at(
            select.as_ref(),
            "GROUP BY is not supported yet",
        ));
    }
    let view = view_name(select)?;
    check_projection(select)?;
    let mut filter = Vec::new();
    if let Some(condition) = &select.selection {
        conjunction(condition, &view, &mut filter)?;
    }
    let query = Query::count_patients(view, filter).canonical()?;
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

fn check_projection(select: &ast::Select) -> Result<(), SqlError> {
    let only_count = || {
        SqlError::at(
            select,
            "expected SELECT COUNT(*) (other aggregates come later)",
        )
    };
    let [SelectItem::UnnamedExpr(Expr::Function(function))] = select.projection.as_slice() else {
        return Err(only_count());
    };
    let is_count = matches!(function.name.0.as_slice(),
        [ObjectNamePart::Identifier(ident)] if ident.value.eq_ignore_ascii_case("count"));
    let FunctionArguments::List(list) = &function.args else {
        return Err(SqlError::at(function, "expected COUNT(*)"));
    };
    let star = matches!(
        list.args.as_slice(),
        [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]
    );
    if !is_count || !star || list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
        return Err(SqlError::at(function, "expected COUNT(*)"));
    }
    if function.filter.is_some()
        || function.over.is_some()
        || !function.within_group.is_empty()
        || function.null_treatment.is_some()
        || function.uses_odbc_syntax
        || !matches!(function.parameters, FunctionArguments::None)
    {
        return Err(SqlError::at(
            function,
            "COUNT(*) takes no FILTER, OVER or WITHIN GROUP; put conditions in WHERE",
        ));
    }
    Ok(())
}

/// Flattens an AND tree into predicates on columns of `view`.
fn conjunction(expr: &Expr, view: &str, out: &mut Vec<Predicate>) -> Result<(), SqlError> {
    match expr {
        Expr::Nested(inner) => conjunction(inner, view, out),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjunction(left, view, out)?;
            conjunction(right, view, out)
        }
        Expr::BinaryOp {
            op: BinaryOperator::Or,
            ..
        } => Err(SqlError::at(
            expr,
            "OR is not supported yet; combine conditions with AND",
        )),
        _ => {
            out.push(predicate(expr, view)?);
            Ok(())
        }
    }
}

/// The column an expression names, if it is a column: `age`, or `patients.age` when the
/// query is on `patients`. Any other qualifier is an error, not silently the same column.
fn column_name(expr: &Expr, view: &str) -> Result<Option<String>, SqlError> {
    match expr {
        Expr::Identifier(ident) => Ok(Some(ident.value.to_ascii_lowercase())),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [qualifier, column] if qualifier.value.eq_ignore_ascii_case(view) => {
                Ok(Some(column.value.to_ascii_lowercase()))
            }
            _ => Err(SqlError::at(
                expr,
                format!("columns may be qualified only by the view queried (`{view}.column`)"),
            )),
        },
        Expr::Nested(inner) => column_name(inner, view),
        _ => Ok(None),
    }
}

/// A literal: integer, string level or boolean.
enum Literal {
    Integer(i64),
    Category(Category),
}

fn literal(expr: &Expr) -> Result<Literal, SqlError> {
    match expr {
        Expr::Value(value) => match &value.value {
            Value::Number(text, _) => text
                .parse::<i64>()
                .map(Literal::Integer)
                .map_err(|_| SqlError::at(expr, format!("`{text}` is not an integer"))),
            Value::SingleQuotedString(text) => Ok(Literal::Category(Category::Level(text.clone()))),
            Value::Boolean(flag) => Ok(Literal::Category(Category::Flag(*flag))),
            _ => Err(SqlError::at(
                expr,
                "expected an integer, a 'quoted level' or true/false",
            )),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr: inner,
        } => match literal(inner)? {
            Literal::Integer(n) => n
                .checked_neg()
                .map(Literal::Integer)
                .ok_or_else(|| SqlError::at(expr, "integer out of range")),
            Literal::Category(_) => Err(SqlError::at(expr, "only numbers can be negated")),
        },
        Expr::Nested(inner) => literal(inner),
        _ => Err(SqlError::at(expr, "expected a literal value here")),
    }
}

fn integer(expr: &Expr) -> Result<i64, SqlError> {
    match literal(expr)? {
        Literal::Integer(n) => Ok(n),
        Literal::Category(_) => Err(SqlError::at(expr, "expected an integer")),
    }
}

fn range(column: String, min: Option<i64>, max: Option<i64>) -> Predicate {
    Predicate::InRange { column, min, max }
}

fn predicate(expr: &Expr, view: &str) -> Result<Predicate, SqlError> {
    if let Some(column) = column_name(expr, view)? {
        return Ok(Predicate::Is {
            column,
            value: Category::Flag(true),
        });
    }
    match expr {
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr: inner,
        } => match column_name(inner, view)? {
            Some(column) => Ok(Predicate::Is {
                column,
                value: Category::Flag(false),
            }),
            None => Err(SqlError::at(
                expr,
                "NOT applies only to a flag column for now, e.g. NOT diabetes",
            )),
        },
        Expr::Between {
            expr: target,
            negated,
            low,
            high,
        } => {
            let column = column_name(target, view)?
                .ok_or_else(|| SqlError::at(target.as_ref(), "expected a column name"))?;
            if *negated {
                return Err(SqlError::at(expr, "NOT BETWEEN is not supported yet"));
            }
            Ok(range(column, Some(integer(low)?), Some(integer(high)?)))
        }
        Expr::BinaryOp { left, op, right } => {
            // Put the column on the left, flipping the operator if needed.
            let (column, value, op) = match (column_name(left, view)?, column_name(right, view)?) {
                (Some(column), None) => (column, right.as_ref(), op.clone()),
                (None, Some(column)) => (column, left.as_ref(), flip(op)),
                _ => {
                    return Err(SqlError::at(
                        expr,
                        "expected a comparison between a column and a value",
                    ));
                }
            };
            comparison(expr, column, op, value)
        }
        _ => Err(SqlError::at(
            expr,
            "expected a comparison (=, <, <=, >, >=, BETWEEN) or a flag column",
        )),
    }
}

fn flip(op: &BinaryOperator) -> BinaryOperator {
    match op {
        BinaryOperator::Lt => BinaryOperator::Gt,
        BinaryOperator::LtEq => BinaryOperator::GtEq,
        BinaryOperator::Gt => BinaryOperator::Lt,
        BinaryOperator::GtEq => BinaryOperator::LtEq,
        other => other.clone(),
    }
}

fn comparison(
    expr: &Expr,
    column: String,
    op: BinaryOperator,
    value: &Expr,
) -> Result<Predicate, SqlError> {
    let literal = literal(value)?;
    match (op, literal) {
        (BinaryOperator::Eq, Literal::Category(value)) => Ok(Predicate::Is { column, value }),
        (BinaryOperator::Eq, Literal::Integer(n)) => Ok(range(column, Some(n), Some(n))),
        (BinaryOperator::Lt, Literal::Integer(n)) => Ok(range(
            column,
            None,
            Some(
                n.checked_sub(1)
                    .ok_or_else(|| SqlError::at(value, "out of range"))?,
            ),
        )),
        (BinaryOperator::LtEq, Literal::Integer(n)) => Ok(range(column, None, Some(n))),
        (BinaryOperator::Gt, Literal::Integer(n)) => Ok(range(
            column,
            Some(
                n.checked_add(1)
                    .ok_or_else(|| SqlError::at(value, "out of range"))?,
            ),
            None,
        )),
        (BinaryOperator::GtEq, Literal::Integer(n)) => Ok(range(column, Some(n), None)),
        (BinaryOperator::NotEq, _) => Err(SqlError::at(
            expr,
            "<> is not supported yet; use = or a range",
        )),
        (op, Literal::Category(_)) => Err(SqlError::at(
            expr,
            format!("`{op}` needs an integer; levels and flags compare only with ="),
        )),
        (op, _) => Err(SqlError::at(
            expr,
            format!("operator `{op}` is not supported"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_a_conjunction_to_the_canonical_ast() {
        let q = compile(
            "select count(*) from patients where age >= 65 and sex = 'female' and diabetes and not cancer and 80 > age",
        )
        .unwrap();
        assert_eq!(
            q.to_string(),
            "SELECT COUNT(*) FROM patients WHERE age BETWEEN 65 AND 79 AND cancer = false AND diabetes = true AND sex = 'female'"
        );
        let same = compile(
            "SELECT COUNT(*) FROM patients WHERE NOT cancer AND sex = 'female' AND (age BETWEEN 65 AND 79) AND diabetes = true",
        )
        .unwrap();
        assert_eq!(q, same);
        let all = compile("SELECT COUNT(*) FROM patients").unwrap();
        assert!(all.filter.is_empty());
    }

    #[test]
    fn errors_point_at_the_offending_sql() {
        let sql = "SELECT COUNT(*) FROM patients\nWHERE age > 3 OR sex = 'male'";
        let err = compile(sql).unwrap_err();
        assert_eq!((err.line, err.column), (2, 7), "{err}");
        assert!(err.message.contains("OR"), "{err}");
        assert!(err.render(sql).contains("      ^"), "{}", err.render(sql));

        let err = compile("SELECT COUNT(*) FROM patients WHERE age > 'old'").unwrap_err();
        assert!(err.message.contains("needs an integer"), "{err}");
        let err = compile("SELECT COUNT(*) FROM patients WHERE").unwrap_err();
        assert_eq!((err.line, err.column), (1, 36), "{err:?}");
        let err = compile("SELECT COUNT(*) FORM patients").unwrap_err();
        assert_eq!((err.line, err.column), (1, 22), "{err:?}");
        assert!(err.message.contains("found: patients"), "{err}");
        let err = compile("SELECT AVG(age) FROM patients").unwrap_err();
        assert!(err.message.contains("COUNT(*)"), "{err}");
        let err = compile("DELETE FROM patients").unwrap_err();
        assert!(err.message.contains("SELECT"), "{err}");
        for ignored in [
            "SELECT COUNT(*) FILTER (WHERE diabetes) FROM patients",
            "SELECT COUNT(*) OVER () FROM patients",
            "SELECT COUNT(*) FROM patients ORDER BY 1",
            "SELECT COUNT(*) FROM patients LIMIT 1",
            "SELECT TOP 5 COUNT(*) FROM patients",
            "SELECT COUNT(*) FROM patients p",
            "SELECT COUNT(*) FROM patients WHERE visits.age > 3",
        ] {
            assert!(compile(ignored).is_err(), "{ignored} was accepted");
        }
        assert!(compile("SELECT COUNT(*) FROM patients WHERE patients.age > 3").is_ok());
        let err = compile("SELECT COUNT(*) FROM patients WHERE age > 60 AND age < 30").unwrap_err();
        assert!(err.message.contains("empty"), "{err}");
    }
}
