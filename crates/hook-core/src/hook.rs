//! The [`Hook`] trait: what runs at a hook site.
//!
//! A hook sees a [`HookContext`] (which component fired, its layer, its call index in the
//! current forward) and the [`HookIo`] of the call. It returns `Ok(None)` to leave the main
//! tensor as it is, or `Ok(Some(t))` to replace it (easyroutine's hooks that `return b`).
//! Closures `FnMut(&HookContext, &HookIo<T>) -> Result<Option<T>>` are hooks.

use crate::{ComponentPath, HookIo, Result};

/// Where a hook fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookContext<'a> {
    /// The component, e.g. `model.layers[2].self_attn.output`.
    pub component: &'a ComponentPath,
    /// The layer of the component, when it has one.
    pub layer: Option<usize>,
    /// How many sites fired before this one in the current forward pass.
    pub call_index: usize,
}

impl<'a> HookContext<'a> {
    /// A context for `component`, with the layer taken from the path.
    ///
    /// ```
    /// use hook_core::{ComponentPath, HookContext};
    /// let p = ComponentPath::parse("model.layers[4].mlp.output").unwrap();
    /// assert_eq!(HookContext::new(&p, 0).layer, Some(4));
    /// ```
    pub fn new(component: &'a ComponentPath, call_index: usize) -> Self {
        Self { component, layer: component.layer(), call_index }
    }
}

/// Code that runs when a component fires.
///
/// ```
/// use hook_core::{ComponentPath, Hook, HookContext, HookIo};
///
/// // A hook that doubles the main tensor (here a plain f32 stands in for a tensor).
/// let mut double = |_: &HookContext, io: &HookIo<f32>| Ok(Some(io.main_tensor()? * 2.0));
/// let p = ComponentPath::parse("model.layers[0].output").unwrap();
/// let out = double.call(&HookContext::new(&p, 0), &HookIo::output_tensor(1.5)).unwrap();
/// assert_eq!(out, Some(3.0));
/// ```
pub trait Hook<T> {
    /// Runs the hook. `Ok(Some(t))` replaces the main tensor with `t`.
    fn call(&mut self, ctx: &HookContext<'_>, io: &HookIo<T>) -> Result<Option<T>>;
}

impl<T, F> Hook<T> for F
where
    F: FnMut(&HookContext<'_>, &HookIo<T>) -> Result<Option<T>>,
{
    fn call(&mut self, ctx: &HookContext<'_>, io: &HookIo<T>) -> Result<Option<T>> {
        self(ctx, io)
    }
}

/// Runs `hook` and, when it returns a replacement, puts it in place of the main tensor
/// (`restore_same_args_kwargs_output`). Returns whether the call was changed.
///
/// ```
/// use hook_core::{hook::apply, ComponentPath, HookContext, HookIo, Value};
/// let p = ComponentPath::parse("model.layers[0].output").unwrap();
/// let mut io = HookIo::with_output(vec![], vec![], Value::Tuple(vec![Value::Tensor(1), Value::None]));
/// let mut zero = |_: &HookContext, _: &HookIo<i32>| Ok(Some(0));
/// assert!(apply(&mut zero, &HookContext::new(&p, 0), &mut io).unwrap());
/// assert_eq!(io.output, Some(Value::Tuple(vec![Value::Tensor(0), Value::None])));
/// ```
pub fn apply<T, H: Hook<T> + ?Sized>(hook: &mut H, ctx: &HookContext<'_>, io: &mut HookIo<T>) -> Result<bool> {
    match hook.call(ctx, io)? {
        Some(t) => {
            io.replace_main_tensor(t)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CoreError, Value};

    struct Recorder(Vec<(String, Option<usize>, usize)>);
    impl Hook<i32> for Recorder {
        fn call(&mut self, ctx: &HookContext<'_>, _io: &HookIo<i32>) -> Result<Option<i32>> {
            self.0.push((ctx.component.to_string(), ctx.layer, ctx.call_index));
            Ok(None)
        }
    }

    #[test]
    fn struct_hooks_see_the_context() {
        let a = ComponentPath::parse("model.layers[1].mlp.output").unwrap();
        let b = ComponentPath::parse("model.norm.input").unwrap();
        let mut r = Recorder(vec![]);
        let mut io = HookIo::output_tensor(1);
        assert!(!apply(&mut r, &HookContext::new(&a, 0), &mut io).unwrap());
        assert!(!apply(&mut r, &HookContext::new(&b, 1), &mut io).unwrap());
        assert_eq!(
            r.0,
            vec![("model.layers[1].mlp.output".into(), Some(1), 0), ("model.norm.input".into(), None, 1)]
        );
        assert_eq!(io, HookIo::output_tensor(1));
    }

    #[test]
    fn hook_errors_propagate_and_leave_io_alone() {
        let p = ComponentPath::parse("model.layers[0].output").unwrap();
        let mut failing = |ctx: &HookContext, _: &HookIo<i32>| -> Result<Option<i32>> {
            Err(CoreError::hook_message(ctx.component.to_string(), "boom"))
        };
        let mut io = HookIo::before(vec![Value::Tensor(3)], vec![]);
        let e = apply(&mut failing, &HookContext::new(&p, 0), &mut io).unwrap_err();
        assert_eq!(e.to_string(), "hook on `model.layers[0].output` failed: boom");
        assert_eq!(io, HookIo::before(vec![Value::Tensor(3)], vec![]));
    }

    #[test]
    fn replacement_without_a_main_tensor_is_an_error() {
        let p = ComponentPath::parse("model.layers[0].output").unwrap();
        let mut io: HookIo<i32> = HookIo::before(vec![], vec![]);
        let mut repl = |_: &HookContext, _: &HookIo<i32>| Ok(Some(1));
        assert!(matches!(apply(&mut repl, &HookContext::new(&p, 0), &mut io), Err(CoreError::NoMainTensor(_))));
    }
}
