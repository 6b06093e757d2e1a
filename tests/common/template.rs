//! `infra/template.yaml` as a deployment would see it: read with cfn-lint's
//! decoder, its intrinsic functions (`!Sub`, `!Ref`, `!GetAtt`, `!If`,
//! conditions) resolved against a stand-in stack, generically, so that
//! statements added to a role later are resolved like the others.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{Map, Value};

use super::{repo, run};

/// cfn-lint's decoder: YAML with CloudFormation's short-form tags, as JSON.
const DECODE: &str = r#"
import json, sys
try:
    from cfnlint.decode import decode
except ImportError as e:
    sys.exit(f"cannot import cfn-lint ({e}): run .ci/setup --test")
template, errors = decode(sys.argv[1])
if errors or template is None:
    sys.exit("cannot read the template:\n" + "\n".join(str(e) for e in errors))
json.dump(template, sys.stdout)
"#;

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

/// The template, and what its references mean in one stand-in deployment.
pub struct Stack {
    pub template: Value,
    /// Parameter values given (the others take their defaults).
    pub parameters: BTreeMap<String, String>,
    /// `Ref` of resources by logical id (a bucket's name, a queue's URL).
    pub refs: BTreeMap<String, String>,
    /// `GetAtt <resource>.Arn` by logical id.
    pub arns: BTreeMap<String, String>,
}

impl Stack {
    pub fn new() -> Stack {
        let json = run(Command::new("python3")
            .args(["-c", DECODE])
            .arg(repo().join("infra/template.yaml")));
        Stack {
            template: serde_json::from_str(&json).expect("the decoded template is JSON"),
            parameters: BTreeMap::new(),
            refs: BTreeMap::new(),
            arns: BTreeMap::new(),
        }
    }

    /// The bucket `ImageBucket` stands for.
    pub fn with_bucket(mut self, logical: &str, name: &str) -> Stack {
        self.refs.insert(logical.into(), name.into());
        self.arns
            .insert(logical.into(), format!("arn:aws:s3:::{name}"));
        self
    }

    /// A queue a logical id stands for.
    pub fn with_queue(mut self, logical: &str, url: &str) -> Stack {
        let name = url.rsplit('/').next().unwrap();
        self.refs.insert(logical.into(), url.into());
        self.arns.insert(
            logical.into(),
            format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"),
        );
        self
    }

    pub fn with_parameter(mut self, name: &str, value: &str) -> Stack {
        self.parameters.insert(name.into(), value.into());
        self
    }

    fn parameter(&self, name: &str) -> Option<String> {
        if let Some(value) = self.parameters.get(name) {
            return Some(value.clone());
        }
        let default = &self.template["Parameters"][name]["Default"];
        match default {
            Value::Null if self.template["Parameters"].get(name).is_some() => Some(String::new()),
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    fn reference(&self, name: &str) -> String {
        match name {
            "AWS::Partition" => "aws".into(),
            "AWS::Region" => REGION.into(),
            "AWS::AccountId" => ACCOUNT.into(),
            "AWS::StackName" => "nixery".into(),
            "AWS::URLSuffix" => "amazonaws.com".into(),
            _ => self
                .parameter(name)
                .or_else(|| self.refs.get(name).cloned())
                // A resource this stand-in does not have: a name that
                // matches nothing real.
                .unwrap_or_else(|| format!("unresolved-{name}")),
        }
    }

    fn get_att(&self, resource: &str, attribute: &str) -> String {
        match (self.arns.get(resource), attribute) {
            (Some(arn), "Arn") => arn.clone(),
            _ => format!("arn:aws:unresolved:::{resource}.{attribute}"),
        }
    }

    /// Whether a named condition holds in this deployment.
    pub fn condition(&self, name: &str) -> bool {
        let expression = &self.template["Conditions"][name];
        assert!(!expression.is_null(), "no condition {name}");
        self.holds(expression)
    }

    fn holds(&self, v: &Value) -> bool {
        let Some((function, args)) = v.as_object().and_then(|o| o.iter().next()) else {
            panic!("not a condition: {v}");
        };
        match function.as_str() {
            "Condition" => self.condition(args.as_str().unwrap()),
            "Fn::Not" => !self.holds(&args[0]),
            "Fn::And" => args.as_array().unwrap().iter().all(|a| self.holds(a)),
            "Fn::Or" => args.as_array().unwrap().iter().any(|a| self.holds(a)),
            // Parameters are strings; a literal may be a number.
            "Fn::Equals" => {
                let text = |v: &Value| match self.resolve(v) {
                    Some(Value::String(s)) => s,
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                text(&args[0]) == text(&args[1])
            }
            other => panic!("unknown condition function {other}"),
        }
    }

    /// `v` with every intrinsic function evaluated; `None` for
    /// `AWS::NoValue` (which also drops out of lists and objects).
    pub fn resolve(&self, v: &Value) -> Option<Value> {
        match v {
            Value::Object(o) if o.len() == 1 => {
                let (key, args) = o.iter().next().unwrap();
                match key.as_str() {
                    "Ref" if args == "AWS::NoValue" => None,
                    "Ref" => Some(Value::String(self.reference(args.as_str().unwrap()))),
                    "Fn::GetAtt" => {
                        let (resource, attribute) = match args {
                            Value::Array(a) => (
                                a[0].as_str().unwrap().to_string(),
                                a[1].as_str().unwrap().to_string(),
                            ),
                            Value::String(s) => {
                                let (r, a) = s.split_once('.').unwrap();
                                (r.to_string(), a.to_string())
                            }
                            other => panic!("Fn::GetAtt of {other}"),
                        };
                        Some(Value::String(self.get_att(&resource, &attribute)))
                    }
                    "Fn::Sub" => Some(Value::String(self.sub(args))),
                    "Fn::If" => {
                        let a = args.as_array().unwrap();
                        let branch = if self.condition(a[0].as_str().unwrap()) {
                            &a[1]
                        } else {
                            &a[2]
                        };
                        self.resolve(branch)
                    }
                    "Fn::Join" => {
                        let a = args.as_array().unwrap();
                        let parts: Vec<String> = self
                            .resolve(&a[1])
                            .unwrap()
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|p| p.as_str().unwrap().to_string())
                            .collect();
                        Some(Value::String(parts.join(a[0].as_str().unwrap())))
                    }
                    _ => Some(Value::Object(self.resolve_object(o))),
                }
            }
            Value::Object(o) => Some(Value::Object(self.resolve_object(o))),
            Value::Array(a) => Some(Value::Array(
                a.iter().filter_map(|item| self.resolve(item)).collect(),
            )),
            other => Some(other.clone()),
        }
    }

    fn resolve_object(&self, o: &Map<String, Value>) -> Map<String, Value> {
        o.iter()
            .filter_map(|(k, v)| Some((k.clone(), self.resolve(v)?)))
            .collect()
    }

    /// `Fn::Sub`: `${Name}` is a `Ref`, `${Resource.Attribute}` a `GetAtt`.
    fn sub(&self, args: &Value) -> String {
        let (text, vars) = match args {
            Value::String(s) => (s.clone(), Map::new()),
            Value::Array(a) => (
                a[0].as_str().unwrap().to_string(),
                a[1].as_object().cloned().unwrap_or_default(),
            ),
            other => panic!("Fn::Sub of {other}"),
        };
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').unwrap() + start;
            let name = &rest[start + 2..end];
            let value = match vars.get(name) {
                Some(v) => self.resolve(v).unwrap().as_str().unwrap().to_string(),
                None => match name.split_once('.') {
                    Some((resource, attribute)) => self.get_att(resource, attribute),
                    None => self.reference(name),
                },
            };
            out.push_str(&value);
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// The logical id of the role a resource's property names (`Role`,
    /// `TaskRoleArn`) by `GetAtt <role>.Arn`.
    pub fn role_of(&self, resource: &str, property: &str) -> String {
        let v = &self.template["Resources"][resource]["Properties"][property];
        match &v["Fn::GetAtt"] {
            Value::Array(a) => a[0].as_str().unwrap().to_string(),
            Value::String(s) => s.split('.').next().unwrap().to_string(),
            _ => panic!("{resource}.{property} names no role of the stack: {v}"),
        }
    }

    /// The logical id of the only resource of a type.
    pub fn only(&self, ty: &str) -> String {
        let found: Vec<&String> = self.template["Resources"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, r)| r["Type"] == ty)
            .map(|(name, _)| name)
            .collect();
        assert_eq!(found.len(), 1, "{ty}: {found:?}");
        found[0].clone()
    }

    /// Every inline policy document of a role, resolved.
    pub fn policies(&self, role: &str) -> Vec<Value> {
        let resource = &self.template["Resources"][role];
        assert!(!resource.is_null(), "no role {role}");
        resource["Properties"]["Policies"]
            .as_array()
            .unwrap_or_else(|| panic!("{role} has no inline Policies"))
            .iter()
            .filter_map(|p| self.resolve(&p["PolicyDocument"]))
            .collect()
    }
}

impl Default for Stack {
    fn default() -> Stack {
        Stack::new()
    }
}
