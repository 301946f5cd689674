//! What a hook sees: a tree of [`Value`]s for the positional args, the keyword args and the
//! (optional) output of a module call, and easyroutine's *main tensor* rule over it.
//!
//! easyroutine's `process_args_kwargs_output` picks the tensor a hook works on:
//! the output if there is one (element 0 of a tuple output), else `args[0]`, else
//! `kwargs["hidden_states"]`. `restore_same_args_kwargs_output` puts a replacement back in
//! the same place. [`HookIo::main_tensor`] and [`HookIo::replace_main_tensor`] are those two
//! rules; where the Python would fail with a `NameError` or pick a non-tensor, they return
//! [`CoreError::NoMainTensor`].

use crate::{CoreError, Result};

/// One value of a module call, generic over the tensor type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<T> {
    /// A tensor.
    Tensor(T),
    /// A Python tuple.
    Tuple(Vec<Value<T>>),
    /// A Python list.
    List(Vec<Value<T>>),
    /// A string-keyed dict, in insertion order.
    Dict(Vec<(String, Value<T>)>),
    /// Python `None`.
    None,
    /// An int.
    Int(i64),
    /// A float.
    Float(f64),
    /// A bool.
    Bool(bool),
    /// A string.
    Str(String),
}

impl<T> Value<T> {
    /// The tensor, if this value is one.
    ///
    /// ```
    /// use hook_core::Value;
    /// assert_eq!(Value::Tensor(3).as_tensor(), Some(&3));
    /// assert_eq!(Value::<i32>::None.as_tensor(), None);
    /// ```
    pub fn as_tensor(&self) -> Option<&T> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The Python type name, for error messages.
    ///
    /// ```
    /// use hook_core::Value;
    /// assert_eq!(Value::<()>::Tuple(vec![]).kind(), "tuple");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "tensor",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::None => "None",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bool(_) => "bool",
            Value::Str(_) => "str",
        }
    }

    /// Every tensor in the tree, depth first.
    ///
    /// ```
    /// use hook_core::Value;
    /// let v = Value::Tuple(vec![Value::Tensor(1), Value::List(vec![Value::Tensor(2)]), Value::Int(7)]);
    /// assert_eq!(v.tensors(), vec![&1, &2]);
    /// ```
    pub fn tensors(&self) -> Vec<&T> {
        let mut out = Vec::new();
        self.collect_tensors(&mut out);
        out
    }

    fn collect_tensors<'a>(&'a self, out: &mut Vec<&'a T>) {
        match self {
            Value::Tensor(t) => out.push(t),
            Value::Tuple(v) | Value::List(v) => v.iter().for_each(|x| x.collect_tensors(out)),
            Value::Dict(kv) => kv.iter().for_each(|(_, x)| x.collect_tensors(out)),
            _ => {}
        }
    }
}

/// Where the main tensor of a [`HookIo`] sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainTensorLocation {
    /// The output itself is the tensor.
    Output,
    /// Element 0 of a tuple output.
    OutputTupleHead,
    /// The first positional argument.
    FirstArg,
    /// The keyword argument `hidden_states`.
    HiddenStatesKwarg,
}

/// The keyword easyroutine falls back to when there is no output and no positional argument.
pub const HIDDEN_STATES: &str = "hidden_states";

/// A module call as a hook sees it: positional args, keyword args (in order) and the output,
/// which is `None` for a hook that runs before the module (a `.input` site).
#[derive(Debug, Clone, PartialEq)]
pub struct HookIo<T> {
    /// Positional arguments.
    pub args: Vec<Value<T>>,
    /// Keyword arguments, in call order.
    pub kwargs: Vec<(String, Value<T>)>,
    /// The output; `None` (or `Some(Value::None)`, as in Python) before the module ran.
    pub output: Option<Value<T>>,
}

impl<T> HookIo<T> {
    /// A call seen before the module runs (no output).
    ///
    /// ```
    /// use hook_core::HookIo;
    /// let io = HookIo::before(vec![hook_core::Value::Tensor(5)], vec![]);
    /// assert_eq!(*io.main_tensor().unwrap(), 5);
    /// ```
    pub fn before(args: Vec<Value<T>>, kwargs: Vec<(String, Value<T>)>) -> Self {
        Self { args, kwargs, output: None }
    }

    /// A call seen after the module ran.
    ///
    /// ```
    /// use hook_core::{HookIo, Value};
    /// let io = HookIo::with_output(vec![Value::Tensor(1)], vec![], Value::Tensor(2));
    /// assert_eq!(*io.main_tensor().unwrap(), 2);
    /// ```
    pub fn with_output(args: Vec<Value<T>>, kwargs: Vec<(String, Value<T>)>, output: Value<T>) -> Self {
        Self { args, kwargs, output: Some(output) }
    }

    /// A call whose only content is one tensor as output (the common case of a hook site).
    ///
    /// ```
    /// use hook_core::HookIo;
    /// assert_eq!(*HookIo::output_tensor(9).main_tensor().unwrap(), 9);
    /// ```
    pub fn output_tensor(t: T) -> Self {
        Self::with_output(Vec::new(), Vec::new(), Value::Tensor(t))
    }

    /// Looks up a keyword argument.
    ///
    /// ```
    /// use hook_core::{HookIo, Value};
    /// let io = HookIo::before(vec![], vec![("hidden_states".into(), Value::Tensor(1))]);
    /// assert!(io.kwarg("hidden_states").is_some());
    /// assert!(io.kwarg("attention_mask").is_none());
    /// ```
    pub fn kwarg(&self, name: &str) -> Option<&Value<T>> {
        self.kwargs.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    fn has_output(&self) -> bool {
        !matches!(self.output, None | Some(Value::None))
    }

    /// Where the main tensor is, following easyroutine's `process_args_kwargs_output`.
    ///
    /// ```
    /// use hook_core::{HookIo, MainTensorLocation, Value};
    /// let io = HookIo::with_output(vec![], vec![], Value::Tuple(vec![Value::Tensor(1)]));
    /// assert_eq!(io.main_tensor_location().unwrap(), MainTensorLocation::OutputTupleHead);
    /// ```
    pub fn main_tensor_location(&self) -> Result<MainTensorLocation> {
        if self.has_output() {
            return match self.output.as_ref() {
                Some(Value::Tensor(_)) => Ok(MainTensorLocation::Output),
                Some(Value::Tuple(items)) => match items.first() {
                    Some(Value::Tensor(_)) => Ok(MainTensorLocation::OutputTupleHead),
                    Some(other) => Err(CoreError::NoMainTensor(format!(
                        "the output is a tuple whose element 0 is a {}, expected a tensor",
                        other.kind()
                    ))),
                    None => Err(CoreError::NoMainTensor("the output is an empty tuple, expected a tensor as element 0".into())),
                },
                Some(other) => Err(CoreError::NoMainTensor(format!(
                    "the output is a {}, expected a tensor or a tuple whose element 0 is a tensor",
                    other.kind()
                ))),
                None => unreachable!("has_output checked"),
            };
        }
        if let Some(first) = self.args.first() {
            return match first {
                Value::Tensor(_) => Ok(MainTensorLocation::FirstArg),
                other => Err(CoreError::NoMainTensor(format!(
                    "there is no output and args[0] is a {}, expected a tensor",
                    other.kind()
                ))),
            };
        }
        match self.kwarg(HIDDEN_STATES) {
            Some(Value::Tensor(_)) => Ok(MainTensorLocation::HiddenStatesKwarg),
            Some(other) => Err(CoreError::NoMainTensor(format!(
                "there is no output and no positional argument, and kwargs[\"hidden_states\"] is a {}, expected a tensor",
                other.kind()
            ))),
            None => Err(CoreError::NoMainTensor(format!(
                "there is no output, no positional argument and no \"hidden_states\" keyword (keywords: [{}])",
                self.kwargs.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The main tensor (`process_args_kwargs_output`).
    ///
    /// ```
    /// use hook_core::{HookIo, Value};
    /// let io: HookIo<i32> = HookIo::before(vec![], vec![]);
    /// assert!(io.main_tensor().is_err());
    /// ```
    pub fn main_tensor(&self) -> Result<&T> {
        let loc = self.main_tensor_location()?;
        Ok(self.slot(loc).as_tensor().expect("location points at a tensor"))
    }

    /// Puts `t` where the main tensor was (`restore_same_args_kwargs_output`) and returns the old
    /// one. Everything else in the tree is left as it was.
    ///
    /// ```
    /// use hook_core::{HookIo, Value};
    /// let mut io = HookIo::with_output(vec![], vec![], Value::Tuple(vec![Value::Tensor(1), Value::Int(4)]));
    /// assert_eq!(io.replace_main_tensor(10).unwrap(), 1);
    /// assert_eq!(io.output, Some(Value::Tuple(vec![Value::Tensor(10), Value::Int(4)])));
    /// ```
    pub fn replace_main_tensor(&mut self, t: T) -> Result<T> {
        let loc = self.main_tensor_location()?;
        let slot = self.slot_mut(loc);
        match std::mem::replace(slot, Value::Tensor(t)) {
            Value::Tensor(old) => Ok(old),
            _ => unreachable!("location points at a tensor"),
        }
    }

    fn slot(&self, loc: MainTensorLocation) -> &Value<T> {
        match loc {
            MainTensorLocation::Output => self.output.as_ref().expect("output"),
            MainTensorLocation::OutputTupleHead => match self.output.as_ref() {
                Some(Value::Tuple(items)) => &items[0],
                _ => unreachable!(),
            },
            MainTensorLocation::FirstArg => &self.args[0],
            MainTensorLocation::HiddenStatesKwarg => self.kwarg(HIDDEN_STATES).expect("hidden_states"),
        }
    }

    fn slot_mut(&mut self, loc: MainTensorLocation) -> &mut Value<T> {
        match loc {
            MainTensorLocation::Output => self.output.as_mut().expect("output"),
            MainTensorLocation::OutputTupleHead => match self.output.as_mut() {
                Some(Value::Tuple(items)) => &mut items[0],
                _ => unreachable!(),
            },
            MainTensorLocation::FirstArg => &mut self.args[0],
            MainTensorLocation::HiddenStatesKwarg => {
                self.kwargs.iter_mut().find(|(k, _)| k == HIDDEN_STATES).map(|(_, v)| v).expect("hidden_states")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    type V = Value<i32>;

    fn t(x: i32) -> V {
        Value::Tensor(x)
    }
    fn hs(v: V) -> Vec<(String, V)> {
        vec![("hidden_states".into(), v)]
    }

    #[rstest]
    #[case::tensor_output(vec![t(1)], vec![], Some(t(2)), MainTensorLocation::Output, 2)]
    #[case::tuple_output(vec![t(1)], vec![], Some(Value::Tuple(vec![t(3), Value::None])), MainTensorLocation::OutputTupleHead, 3)]
    #[case::tuple_output_single(vec![], vec![], Some(Value::Tuple(vec![t(4)])), MainTensorLocation::OutputTupleHead, 4)]
    #[case::no_output_args(vec![t(5), t(6)], hs(t(7)), None, MainTensorLocation::FirstArg, 5)]
    #[case::python_none_output_is_no_output(vec![t(5)], vec![], Some(Value::None), MainTensorLocation::FirstArg, 5)]
    #[case::none_output_empty_args_kwargs(vec![], hs(t(7)), None, MainTensorLocation::HiddenStatesKwarg, 7)]
    #[case::hidden_states_among_kwargs(vec![], vec![("attention_mask".into(), t(0)), ("hidden_states".into(), t(8))], Some(Value::None), MainTensorLocation::HiddenStatesKwarg, 8)]
    fn main_tensor_rule(
        #[case] args: Vec<V>,
        #[case] kwargs: Vec<(String, V)>,
        #[case] output: Option<V>,
        #[case] loc: MainTensorLocation,
        #[case] expected: i32,
    ) {
        let io = HookIo { args, kwargs, output };
        assert_eq!(io.main_tensor_location().unwrap(), loc);
        assert_eq!(*io.main_tensor().unwrap(), expected);
    }

    #[rstest]
    #[case::nothing(vec![], vec![], None, "no \"hidden_states\" keyword (keywords: [])")]
    #[case::kwargs_without_hidden_states(vec![], vec![("x".into(), t(1)), ("y".into(), t(2))], None, "(keywords: [x, y])")]
    #[case::empty_tuple(vec![t(1)], vec![], Some(Value::Tuple(vec![])), "empty tuple")]
    #[case::tuple_head_not_tensor(vec![], vec![], Some(Value::Tuple(vec![Value::None, t(1)])), "element 0 is a None")]
    #[case::list_output(vec![], vec![], Some(Value::List(vec![t(1)])), "the output is a list")]
    #[case::dict_output(vec![], vec![], Some(Value::Dict(vec![("a".into(), t(1))])), "the output is a dict")]
    #[case::int_arg(vec![Value::Int(3)], vec![], None, "args[0] is a int")]
    #[case::hidden_states_not_tensor(vec![], hs(Value::Str("x".into())), None, "kwargs[\"hidden_states\"] is a str")]
    fn main_tensor_errors(
        #[case] args: Vec<V>,
        #[case] kwargs: Vec<(String, V)>,
        #[case] output: Option<V>,
        #[case] fragment: &str,
    ) {
        let mut io = HookIo { args, kwargs, output };
        let before = io.clone();
        let err = io.main_tensor().unwrap_err().to_string();
        assert!(err.contains(fragment), "{err}");
        assert!(io.replace_main_tensor(0).is_err());
        assert_eq!(io, before, "a failed replace leaves the tree as it was");
    }

    #[rstest]
    #[case::tensor_output(HookIo::with_output(vec![t(1)], vec![], t(2)), HookIo::with_output(vec![t(1)], vec![], t(9)))]
    #[case::tuple_output(
        HookIo::with_output(vec![], vec![], Value::Tuple(vec![t(2), t(3), Value::Int(1)])),
        HookIo::with_output(vec![], vec![], Value::Tuple(vec![t(9), t(3), Value::Int(1)]))
    )]
    #[case::first_arg(HookIo::before(vec![t(1), t(2)], hs(t(3))), HookIo::before(vec![t(9), t(2)], hs(t(3))))]
    #[case::hidden_states(
        HookIo::before(vec![], vec![("mask".into(), t(0)), ("hidden_states".into(), t(3))]),
        HookIo::before(vec![], vec![("mask".into(), t(0)), ("hidden_states".into(), t(9))])
    )]
    fn restore_puts_back_in_place(#[case] mut io: HookIo<i32>, #[case] expected: HookIo<i32>) {
        let old = *io.main_tensor().unwrap();
        assert_eq!(io.replace_main_tensor(9).unwrap(), old);
        assert_eq!(io, expected);
    }

    #[test]
    fn tensors_walks_the_tree() {
        let v: V = Value::Dict(vec![
            ("a".into(), Value::Tuple(vec![t(1), Value::Float(0.5), Value::Bool(true)])),
            ("b".into(), Value::List(vec![t(2), Value::Str("s".into())])),
        ]);
        assert_eq!(v.tensors(), vec![&1, &2]);
    }
}
